# Renders the book with Sphinx; run by the `book` target (book/CMakeLists.txt) as
#   cmake -DSPHINX_BUILD=... -DCONF_DIR=<repo>/book -DPAGES=<book pages> -DCHAPTERS_DIR=<repo>/chapters
#         -DGENERATED_DIR=<build>/generated -DDOXYGEN_XML=<build>/book/doxygen/xml -DBOOK_DIR=<build>/book
#         -P render.cmake
# BOOK_DIR receives src/ (the Sphinx source folder, made of links), doctrees/ (Sphinx's cache), html/ and
# html.stamp (touched when the book rendered without a warning).

if(NOT EXISTS ${SPHINX_BUILD})
  message(FATAL_ERROR "Sphinx is missing (${SPHINX_BUILD}): run scripts/install_deps.sh")
endif()

# The source folder: book/'s pages next to `chapters` and `generated`, so that a chapter page is the
# document chapters/NN_slug/README and can include /generated/... files (book/api/ is linked whole, as api/).
# Remaking the links is cheap and drops the link of a page that no longer exists; Sphinx looks at the files
# behind them.
set(source_dir ${BOOK_DIR}/src)
file(REMOVE_RECURSE ${source_dir})  # removes the links, never what they point to
file(MAKE_DIRECTORY ${source_dir})
foreach(page IN LISTS PAGES)
  if(page STREQUAL "")  # a list written with a trailing ';'
    continue()
  endif()
  get_filename_component(name ${page} NAME)
  file(CREATE_LINK ${page} ${source_dir}/${name} SYMBOLIC)
endforeach()
# The API reference's pages live in book/api/ (one page per group of headers).
if(IS_DIRECTORY ${CONF_DIR}/api)
  file(CREATE_LINK ${CONF_DIR}/api ${source_dir}/api SYMBOLIC)
endif()
file(CREATE_LINK ${CHAPTERS_DIR} ${source_dir}/chapters SYMBOLIC)
file(CREATE_LINK ${GENERATED_DIR} ${source_dir}/generated SYMBOLIC)

set(doctrees ${BOOK_DIR}/doctrees)
execute_process(
  COMMAND ${SPHINX_BUILD} -W --keep-going -q -b html -c ${CONF_DIR} -d ${doctrees}
          -D breathe_projects.af=${DOXYGEN_XML} ${source_dir} ${BOOK_DIR}/html
  RESULT_VARIABLE status)
if(NOT status EQUAL 0)
  # Sphinx keeps the pages it read, warnings or not, in its cache; forget them so that the next build reads
  # every page again and reports the same warnings instead of passing.
  file(REMOVE_RECURSE ${doctrees})
  message(FATAL_ERROR "The book has warnings or errors (above); warnings are errors here.")
endif()
file(TOUCH ${BOOK_DIR}/html.stamp)
