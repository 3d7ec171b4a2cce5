# Runs PROGRAM with ARGS and fails unless it exits with EXPECTED and, when MESSAGE is set, prints text matching
# that regular expression. When ABSENT is set, also fails if that path exists after the run (a directory the
# program must not have created).
execute_process(COMMAND ${PROGRAM} ${ARGS} OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE status)
if(NOT status EQUAL EXPECTED)
  message(FATAL_ERROR "${PROGRAM} ${ARGS}: exit status ${status}, expected ${EXPECTED}\n${out}${err}")
endif()
if(MESSAGE AND NOT "${out}${err}" MATCHES "${MESSAGE}")
  message(FATAL_ERROR "${PROGRAM} ${ARGS}: the output does not mention \"${MESSAGE}\"\n${out}${err}")
endif()
if(ABSENT AND EXISTS "${ABSENT}")
  message(FATAL_ERROR "${PROGRAM} ${ARGS}: created ${ABSENT}, which it must not\n${out}${err}")
endif()
