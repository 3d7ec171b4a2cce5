# The README's two commands. Both install what is missing (scripts/install_deps.sh), configure and build;
# both are idempotent and quick the second time.
#   make book   build everything, run the chapter programs, draw the figures, render build/book/html
#   make test   all of that, then every test: CTest (Catch2, chapter self-checks, oracle, browser check of the
#               rendered book) and the CPU tests again under AddressSanitizer + UBSan
.PHONY: book test deps configure build clean

JOBS ?= $(shell nproc)

deps:
	bash scripts/install_deps.sh

configure: deps
	cmake --preset default

build: configure
	cmake --build --preset default -j $(JOBS)

book: build
	cmake --build --preset default -j $(JOBS) --target book
	@echo "The book: $(CURDIR)/build/book/html/index.html"

test: book
	ctest --preset default -j $(JOBS)
	cmake --preset sanitize
	cmake --build --preset sanitize -j $(JOBS)
	ctest --preset sanitize -j $(JOBS)

clean:
	rm -rf build
