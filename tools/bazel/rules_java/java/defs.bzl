# Offline stand-in for rules_java: @bazel_tools//tools/jdk loads these names;
# kood builds no Java. They forward to the native rules of Bazel 4.2.3.

def java_binary(**attrs):
    native.java_binary(**attrs)

def java_import(**attrs):
    native.java_import(**attrs)

def java_library(**attrs):
    native.java_library(**attrs)

def java_runtime(**attrs):
    native.java_runtime(**attrs)

def java_toolchain(**attrs):
    native.java_toolchain(**attrs)
