# The book build's view of a failed check: runs run_and_capture.cmake on PROGRAM (with AF_PERTURB_CHECK set by
# the test) and fails unless that run fails, names the failed check (CHECK), and leaves no output file behind.
set(output ${WORK_DIR}/output.txt)
file(MAKE_DIRECTORY ${WORK_DIR})
execute_process(COMMAND ${CMAKE_COMMAND} -DPROGRAM=${PROGRAM} "-DARGS=--out;${WORK_DIR}" -DOUTPUT=${output}
                        -P ${CMAKE_CURRENT_LIST_DIR}/run_and_capture.cmake
                OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE status)
if(status EQUAL 0)
  message(FATAL_ERROR "the book run of ${PROGRAM} succeeded although a check was perturbed\n${out}${err}")
endif()
if(NOT "${err}" MATCHES "a check failed:.*${CHECK}.*FAIL")
  message(FATAL_ERROR "the failed book run does not name the failed check\n${out}${err}")
endif()
if(EXISTS ${output})
  message(FATAL_ERROR "the failed book run left ${output} behind")
endif()
