# ctest driver: install lora from BUILD_DIR into a fresh prefix, then configure,
# build and run the consumer project against it (MODE=install), or build the
# consumer with add_subdirectory of SOURCE_DIR (MODE=subdirectory).
# Variables: BUILD_DIR, SOURCE_DIR, WORK_DIR, MODE, GENERATOR;
#   CONFIGURE_ARGS   extra arguments for the consumer's configure step, separated by '|';
#   CONFIGURE_ONLY   stop after a successful configure;
#   EXPECT_FAILURE   a regex: the configure step must fail and print it.
function(run_step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
string(REPLACE "|" ";" CONFIGURE_ARGS "${CONFIGURE_ARGS}")
set(consumer_src "${SOURCE_DIR}/tests/consumer")
if(MODE STREQUAL "install")
  run_step(${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${WORK_DIR}/prefix")
  set(configure ${CMAKE_COMMAND} -S "${consumer_src}" -B "${WORK_DIR}/build" -G "${GENERATOR}"
                "-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix" -DCMAKE_BUILD_TYPE=Release ${CONFIGURE_ARGS})
else()
  set(configure ${CMAKE_COMMAND} -S "${consumer_src}" -B "${WORK_DIR}/build" -G "${GENERATOR}"
                "-DLORA_CONSUMER_SOURCE_DIR=${SOURCE_DIR}" -DLORA_ENABLE_CUDA=OFF -DCMAKE_BUILD_TYPE=Release
                ${CONFIGURE_ARGS})
endif()
if(DEFINED EXPECT_FAILURE)
  execute_process(COMMAND ${configure} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(rc EQUAL 0)
    message(FATAL_ERROR "the consumer's configure succeeded; expected it to fail with \"${EXPECT_FAILURE}\"\n${out}")
  endif()
  if(NOT "${out}${err}" MATCHES "${EXPECT_FAILURE}")
    message(FATAL_ERROR "the consumer's configure failed without \"${EXPECT_FAILURE}\":\n${out}\n${err}")
  endif()
  message(STATUS "configure failed as expected: ${err}")
  return()
endif()
run_step(${configure})
if(CONFIGURE_ONLY)
  return()
endif()
run_step(${CMAKE_COMMAND} --build "${WORK_DIR}/build" --target consumer)
run_step("${WORK_DIR}/build/consumer")
