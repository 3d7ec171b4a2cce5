# af_add_chapter(FOLDER [OUTPUTS file...] [ARGS arg...])
#   Builds chapters/FOLDER/*.cpp (or *.cu) into build/bin/chFOLDER, registers the program's default run as a
#   CTest test (its self-checks), and, for the book, runs it with --out build/generated/FOLDER, capturing
#   its standard output in build/generated/FOLDER/output.txt. OUTPUTS names the data files the run writes
#   there (the figures depend on them). A .cu chapter (a kernel chapter) is built when nvcc is present; its
#   self-check carries the label gpu and is skipped (exit 77) without a GPU, its flag tests (label cpu) run
#   anywhere; its book outputs are the measured results committed beside it, not a run of the build machine.
set(AF_CHAPTER_OUTPUTS "" CACHE INTERNAL "Every generated chapter file the book depends on")

function(af_add_chapter folder)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "" "OUTPUTS;ARGS")
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
  add_test(NAME ${target}.self_check COMMAND ${target} ${arg_ARGS})
  if(sources MATCHES "\\.cu$")
    # A kernel chapter's program exits 77 when the machine has no GPU: CTest reports it as skipped.
    target_link_libraries(${target} PRIVATE af::kernels)
    set_tests_properties(${target}.self_check PROPERTIES LABELS "gpu;chapter" SKIP_RETURN_CODE 77)
    # Its flags are parsed before it looks for a GPU, so the flag contract holds on any machine (label cpu).
    foreach(case IN ITEMS "help|0|--help|--seed" "unknown|2|--no-such-flag|no-such-flag"
                          "negative_seed|2|--seed,-1|--seed" "overflowing_seed|2|--seed,18446744073709551616|--seed")
      string(REPLACE "|" ";" fields "${case}")
      list(GET fields 0 name)
      list(GET fields 1 expected)
      list(GET fields 2 args)
      list(GET fields 3 message)
      string(REPLACE "," ";" args "${args}")
      add_test(NAME ${target}.flags_${name}
               COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:${target}> "-DARGS=${args}" -DEXPECTED=${expected}
                       -DMESSAGE=${message} -P ${PROJECT_SOURCE_DIR}/cmake/expect_exit.cmake)
      set_tests_properties(${target}.flags_${name} PROPERTIES LABELS "cpu;chapter")
    endforeach()
  else()
    set_tests_properties(${target}.self_check PROPERTIES LABELS "cpu;chapter")
    # The flag contract every chapter keeps: --help and --out work; a bad value or flag exits 2 and says why.
    foreach(case IN ITEMS "help|0|--help|--out" "zero|2|--seq-len,0|--seq-len" "unknown|2|--no-such-flag|no-such-flag")
      string(REPLACE "|" ";" fields "${case}")
      list(GET fields 0 name)
      list(GET fields 1 expected)
      list(GET fields 2 args)
      list(GET fields 3 message)
      string(REPLACE "," ";" args "${args}")
      add_test(NAME ${target}.flags_${name}
               COMMAND ${CMAKE_COMMAND} -DPROGRAM=$<TARGET_FILE:${target}> "-DARGS=${args}" -DEXPECTED=${expected}
                       -DMESSAGE=${message} -P ${PROJECT_SOURCE_DIR}/cmake/expect_exit.cmake)
      set_tests_properties(${target}.flags_${name} PROPERTIES LABELS "cpu;chapter")
    endforeach()
  endif()

  if(sources MATCHES "\\.cpp$")
    af_add_book_run(${target} ${folder} ARGS ${arg_ARGS} OUTPUTS ${arg_OUTPUTS})
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
