# Offline stand-in for rules_cc: Bazel 4.2.3 (Debian bazel-bootstrap) only needs
# these names from @rules_cc, and the Debian bazel-rules-cc 0.0.4 needs a newer
# Bazel (use_cpp_toolchain). kood builds no C++; these forward to the native rules.

def cc_library(**attrs):
    native.cc_library(**attrs)

def cc_binary(**attrs):
    native.cc_binary(**attrs)

def cc_test(**attrs):
    native.cc_test(**attrs)

def cc_import(**attrs):
    native.cc_import(**attrs)

def cc_toolchain(**attrs):
    native.cc_toolchain(**attrs)

def cc_toolchain_suite(**attrs):
    native.cc_toolchain_suite(**attrs)

def objc_library(**attrs):
    native.objc_library(**attrs)

def objc_import(**attrs):
    native.objc_import(**attrs)
