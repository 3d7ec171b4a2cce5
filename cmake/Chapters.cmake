# af_add_chapter(FOLDER [OUTPUTS file...] [ARGS arg...] [TEST_ARGS arg...] [FAILED_CHECK_ARGS arg...]
#                [FLOAT_FLAGS flag...])
#   Builds chapters/FOLDER/*.cpp (or *.cu) into build/bin/chFOLDER, registers the program's default run as a
#   CTest test (its self-checks), and, for the book, runs it with --out build/generated/FOLDER, capturing
#   its standard output in build/generated/FOLDER/output.txt. OUTPUTS names the data files the run writes
#   there (the figures depend on them). A .cu chapter (a kernel chapter) is built when nvcc is present; its
#   self-check carries the label gpu and is skipped (exit 77) without a GPU, while its flag tests (label cpu) run
#   anywhere; its book outputs are the measured results committed beside it, not a run of the build machine.
#   FLOAT_FLAGS names the chapter's floating-point flags, each tested to refuse nan and inf; NO_SEED marks a
#   program that draws nothing at random (no --seed flag to test). TEST_ARGS are added to ARGS for the CTest
#   runs only (a smaller run of a program whose book run takes minutes); FAILED_CHECK_ARGS replace them for the
#   run that shows a failed check exits 1 (which needs only the checks to run, not a long measurement).
set(AF_CHAPTER_OUTPUTS "" CACHE INTERNAL "Every generated chapter file the book depends on")

# af_add_exit_tests(TARGET LABELS label... [ABSENT path] CASES case...): one CTest test per case, named
# TARGET.flags_NAME, for a case written "NAME|STATUS|ARG,ARG,...|MESSAGE": the program run with the ARGs must
# exit with STATUS and print text matching MESSAGE (and must not create ABSENT).
function(af_add_exit_tests target)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "ABSENT" "LABELS;CASES")
  foreach(case IN LISTS arg_CASES)
    string(REPLACE "|" ";" fields "${case}")
    list(GET fields 0 name)
    list(GET fields 1 expected)
    list(GET fields 2 args)
    list(GET fields 3 message)
    string(REPLACE "," ";" args "${args}")
    add_test(NAME ${target}.flags_${name}
             COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:${target}> "-DARGS=${args}" -DEXPECTED=${expected}
                     -DMESSAGE=${message} -DABSENT=${arg_ABSENT} -P ${PROJECT_SOURCE_DIR}/cmake/expect_exit.cmake)
    set_tests_properties(${target}.flags_${name} PROPERTIES LABELS "${arg_LABELS}")
  endforeach()
endfunction()

function(af_add_chapter folder)
  cmake_parse_arguments(PARSE_ARGV 1 arg "NO_SEED" "" "OUTPUTS;ARGS;TEST_ARGS;FAILED_CHECK_ARGS;FLOAT_FLAGS")
  set(target ch${folder})
  file(GLOB sources CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/${folder}/*.cpp
       ${CMAKE_CURRENT_SOURCE_DIR}/${folder}/*.cu)
  list(LENGTH sources count)
  if(NOT count EQUAL 1)
    message(FATAL_ERROR "chapters/${folder} must hold exactly one program (.cpp or .cu), found: ${sources}")
  endif()
  if(sources MATCHES "\\.cu$" AND NOT AF_HAVE_CUDA)
    message(STATUS "chapters/${folder}: skipped (needs nvcc)")
    return()
  endif()
  add_executable(${target} ${sources})
  target_link_libraries(${target} PRIVATE af::af)
  add_test(NAME ${target}.self_check COMMAND ${target} ${arg_ARGS} ${arg_TEST_ARGS})
  # The flag contract every chapter keeps, kernel chapters included (they parse their flags before they look
  # for a GPU): --help works; a bad flag or value exits 2 and says why, before anything runs; a seed that would
  # wrap (-1, above 2^64 - 1) is refused; for the CPU chapters also --out that is a file, inside a file
  # (/dev/full/x) or two levels below anything that exists (and nothing is created), and nan or inf for a float.
  set(missing ${CMAKE_CURRENT_BINARY_DIR}/${target}_flag_tests/missing)
  set(cases "unknown|2|--no-such-flag|no-such-flag")
  if(NOT arg_NO_SEED)
    list(APPEND cases "seed_negative|2|--seed,-1|-1 is not a seed"
         "seed_overflow|2|--seed,99999999999999999999999|not a seed")
  endif()
  if(sources MATCHES "\\.cu$")
    # A kernel chapter's program exits 77 when the machine has no GPU: CTest reports it as skipped.
    target_link_libraries(${target} PRIVATE af::kernels)
    set_tests_properties(${target}.self_check PROPERTIES LABELS "gpu;chapter" SKIP_RETURN_CODE 77)
    list(APPEND cases "help|0|--help|--seed")
  else()
    set_tests_properties(${target}.self_check PROPERTIES LABELS "cpu;chapter")
    list(APPEND cases "help|0|--help|--out" "zero|2|--seq-len,0|--seq-len"
         "out_is_a_file|2|--out,${PROJECT_SOURCE_DIR}/CMakeLists.txt|is not a directory"
         "out_in_a_device|2|--out,/dev/full/x|/dev/full is not an existing directory"
         "out_missing_parent|2|--out,${missing}/child|${missing} is not an existing directory")
    foreach(flag IN LISTS arg_FLOAT_FLAGS)
      string(REGEX REPLACE "^--" "" name "${flag}")
      string(REPLACE "-" "_" name "${name}")
      list(APPEND cases "${name}_nan|2|${flag},nan|nan is not finite" "${name}_inf|2|${flag},inf|inf is not finite")
    endforeach()
  endif()
  af_add_exit_tests(${target} LABELS cpu chapter ABSENT ${missing} CASES ${cases})
  if(sources MATCHES "\\.cpp$")
    # Exit status 1: one check made to fail on purpose (af::Checks reads AF_PERTURB_CHECK) fails the program.
    # FAILED_CHECK_ARGS, when given, replace TEST_ARGS for this run: a smaller one whose checks still run.
    set(failed_check_args ${arg_TEST_ARGS})
    if(arg_FAILED_CHECK_ARGS)
      set(failed_check_args ${arg_FAILED_CHECK_ARGS})
    endif()
    add_test(NAME ${target}.failed_check_exits_1
             COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:${target}> "-DARGS=${arg_ARGS};${failed_check_args}" -DEXPECTED=1
                     "-DMESSAGE=FAIL  .perturbed by AF_PERTURB_CHECK" -P ${PROJECT_SOURCE_DIR}/cmake/expect_exit.cmake)
    # It runs the whole program again, so it stays out of the sanitizer run (label cpu): the self-check covers
    # the same code there.
    set_tests_properties(${target}.failed_check_exits_1 PROPERTIES LABELS "chapter" ENVIRONMENT
                                                                   "AF_PERTURB_CHECK=*")
    # Every flag at its minimum and at its maximum, the others at their defaults: each runs, passes its checks
    # and finishes in seconds (tests/chapter_flags/flag_extremes.cmake). Minutes for all chapters, so only with
    # AF_FLAG_EXTREMES, under its own label; af_add_flag_test adds a few cheap cases to every build.
    if(AF_FLAG_EXTREMES)
      add_test(NAME ${target}.flag_extremes
               COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:${target}> -P
                       ${PROJECT_SOURCE_DIR}/tests/chapter_flags/flag_extremes.cmake)
      set_tests_properties(${target}.flag_extremes PROPERTIES LABELS flag_extremes TIMEOUT 1200)
    endif()
  endif()

  if(sources MATCHES "\\.cpp$")
    af_add_book_run(${target} ${folder} ARGS ${arg_ARGS} OUTPUTS ${arg_OUTPUTS})
  endif()
endfunction()

# af_add_flag_test(FOLDER NAME EXPECTED MESSAGE ARG...)
#   One more flag test of a chapter (label chapter; cpu too for a refusal): runs it with the ARGs and expects exit status EXPECTED
#   and, unless MESSAGE is empty, output matching the regular expression MESSAGE.
function(af_add_flag_test folder name expected message)
  set(target ch${folder})
  if(NOT TARGET ${target})
    return()
  endif()
  add_test(NAME ${target}.flags_${name}
           COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:${target}> "-DARGS=${ARGN}" -DEXPECTED=${expected}
                   "-DMESSAGE=${message}" -P ${PROJECT_SOURCE_DIR}/cmake/expect_exit.cmake)
  # A run that must pass at a flag's maximum is a full, heavy run: not repeated under the sanitizers (label cpu);
  # a refusal (exit 2) is cheap and stays there.
  if(expected EQUAL 0)
    set_tests_properties(${target}.flags_${name} PROPERTIES LABELS "chapter")
  else()
    set_tests_properties(${target}.flags_${name} PROPERTIES LABELS "cpu;chapter")
  endif()
endfunction()

# af_add_book_run(TARGET FOLDER [ARGS arg...] [OUTPUTS file...])
#   For the book: runs TARGET with ARGS and --out build/generated/FOLDER, capturing its standard output in
#   build/generated/FOLDER/output.txt; OUTPUTS names the data files the run writes there. A failed run fails
#   the build. Nothing happens when the book is not built (AF_BUILD_BOOK OFF).
function(af_add_book_run target folder)
  cmake_parse_arguments(PARSE_ARGV 2 arg "" "" "OUTPUTS;ARGS")
  if(NOT AF_BUILD_BOOK)
    return()
  endif()
  set(out_dir ${AF_GENERATED_DIR}/${folder})
  set(outputs ${out_dir}/output.txt)
  foreach(name IN LISTS arg_OUTPUTS)
    list(APPEND outputs ${out_dir}/${name})
  endforeach()
  add_custom_command(
    OUTPUT ${outputs}
    COMMAND ${CMAKE_COMMAND} -E make_directory ${out_dir}
    COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:${target}> "-DARGS=${arg_ARGS};--out;${out_dir}"
            -DOUTPUT=${out_dir}/output.txt -P ${PROJECT_SOURCE_DIR}/cmake/run_and_capture.cmake
    DEPENDS ${target} ${PROJECT_SOURCE_DIR}/cmake/run_and_capture.cmake
    COMMENT "Running ${target} for the book"
    VERBATIM)
  add_custom_target(${target}_outputs DEPENDS ${outputs})
  set(AF_CHAPTER_OUTPUTS ${AF_CHAPTER_OUTPUTS} ${outputs} CACHE INTERNAL "")
endfunction()
