# Runs PROGRAM with ARGS, writes its standard output to OUTPUT, and fails the build if the program fails.
# Exit status 1 means a check failed: the message repeats the program's FAIL lines, so the build log says which.
execute_process(COMMAND ${PROGRAM} ${ARGS} OUTPUT_VARIABLE out ERROR_VARIABLE errors RESULT_VARIABLE status)
if(NOT status EQUAL 0)
  file(REMOVE ${OUTPUT})
  set(failed_checks "")
  if(status EQUAL 1)
    string(REGEX MATCHALL "[^\n]*FAIL[^\n]*" failed_lines "${out}")
    list(JOIN failed_lines "\n" failed_checks)
    set(failed_checks "a check failed:\n${failed_checks}\n")
  endif()
  message(FATAL_ERROR "${PROGRAM} ${ARGS} exited with status ${status}\n${failed_checks}${errors}")
endif()
file(WRITE ${OUTPUT} "${out}")
