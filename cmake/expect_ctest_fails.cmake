# `make test`'s view of a failed check: runs CTest on one chapter's self-check (with AF_PERTURB_CHECK set by the
# test) and fails unless CTest itself fails.
execute_process(COMMAND ${CMAKE_CTEST_COMMAND} --test-dir ${BUILD_DIR} -R "^${TEST}$" --output-on-failure
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE status)
if(status EQUAL 0)
  message(FATAL_ERROR "ctest passed ${TEST} although a check was perturbed\n${out}${err}")
endif()
if(NOT "${out}" MATCHES "FAIL")
  message(FATAL_ERROR "ctest failed, but its output does not show the failed check\n${out}${err}")
endif()
