# Runs PROGRAM with ARGS, writes its standard output to OUTPUT, and fails the build if the program fails.
execute_process(COMMAND ${PROGRAM} ${ARGS} OUTPUT_FILE ${OUTPUT} ERROR_VARIABLE errors RESULT_VARIABLE status)
if(NOT status EQUAL 0)
  file(REMOVE ${OUTPUT})
  message(FATAL_ERROR "${PROGRAM} ${ARGS} exited with status ${status}\n${errors}")
endif()
