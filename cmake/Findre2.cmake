# Finds RE2 (lora/io matches PEFT's rank_pattern / alpha_pattern with it) and
# defines the target re2::re2: RE2's own CMake package where it is installed
# (RE2 >= 2023 ships one), else the header and library found directly (Debian
# 12's libre2-dev has no CMake package, only a pkg-config file). Installed
# beside loraConfig.cmake so a find_package(lora) consumer finds RE2 the same way.
find_package(re2 CONFIG QUIET)
if(TARGET re2::re2)
  set(re2_FOUND TRUE)
  return()
endif()

find_package(PkgConfig QUIET)
if(PKG_CONFIG_FOUND)
  pkg_check_modules(PC_RE2 QUIET re2)
endif()
find_path(RE2_INCLUDE_DIR re2/re2.h HINTS ${PC_RE2_INCLUDE_DIRS})
find_library(RE2_LIBRARY re2 HINTS ${PC_RE2_LIBRARY_DIRS})
mark_as_advanced(RE2_INCLUDE_DIR RE2_LIBRARY)

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(re2 REQUIRED_VARS RE2_LIBRARY RE2_INCLUDE_DIR)
if(re2_FOUND AND NOT TARGET re2::re2)
  find_package(Threads REQUIRED)  # RE2 is built with -pthread
  add_library(re2::re2 UNKNOWN IMPORTED)
  set_target_properties(re2::re2 PROPERTIES IMPORTED_LOCATION "${RE2_LIBRARY}"
                                            INTERFACE_INCLUDE_DIRECTORIES "${RE2_INCLUDE_DIR}"
                                            INTERFACE_LINK_LIBRARIES Threads::Threads)
endif()
