#!/usr/bin/python3
"""Opens every page of the rendered book in headless Chromium and fails on what a reader would see broken.

    /usr/bin/python3 tests/browser/check_pages.py [--html build/book/html] [--pages PAGE ...]
                                                  [--search WORD] [--screenshot DIR]

For each page (every .html file under --html, or only --pages, given relative to it) it fails on:
  - a page that does not load (an error or an empty page);
  - an <img> whose image did not load (the SVG figures included), an <object> or <embed> whose file is
    missing;
  - math that MathJax left untypeset: once MathJax has finished, every element of class "math" must hold
    MathJax output, no MathJax error, and no raw TeX delimiters in its visible text;
  - a SEVERE message in the browser console (a script error, a file that failed to load);
  - a broken internal link: an <a href> to a local file that does not exist, or to an #anchor that the target
    page does not define (no element with that id or name);
  - for search.html, a search for --search WORD that finds nothing.
--screenshot DIR saves a full-page PNG of each checked page there, for a person to look at.

It drives Debian's chromium through Debian's chromedriver, named explicitly, so that Selenium downloads
nothing; run it with Debian's /usr/bin/python3, which has python3-selenium.
Exit status: 0 when every page is clean, 1 when a page has a problem (each one is printed), 2 on a usage
or setup error, 77 (CTest's skip) when the book has not been rendered.
"""

import argparse
import base64
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, unquote, urlparse

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
except ImportError:  # not Debian's python3; main() says so
    webdriver = None

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SKIP = 77
MATHJAX_TIMEOUT_S = 60
MAX_SHOWN = 8  # problems printed per page

# Waits for MathJax 2 (when the page loads it) to finish its startup typesetting and its queue, then calls
# back; "absent" when the page has no MathJax, "timeout" if it never finishes.
WAIT_FOR_MATHJAX = """
const done = arguments[arguments.length - 1];
if (!window.MathJax || !window.MathJax.Hub) { done(document.querySelector('.math') ? 'missing' : 'absent'); return; }
const timer = setTimeout(() => done('timeout'), arguments[0] * 1000);
// The hook must not return the queued callback: MathJax would then hold its startup until that callback ran.
MathJax.Hub.Register.StartupHook('End', () => { MathJax.Hub.Queue(() => { clearTimeout(timer); done('done'); }); });
"""

# Returns [problems, urls]: one line per problem found in the loaded page, and the URLs of its <object> and
# <embed> elements (a file:// page cannot look into them; check_page looks for the files instead).
FIND_PROBLEMS = r"""
const problems = [];
for (const img of document.images) {
  if (!img.complete || img.naturalWidth === 0) problems.push('image did not load: ' + img.getAttribute('src'));
}
const embedded = Array.from(document.querySelectorAll('object[data], embed[src]'), (el) => el.data || el.src);
for (const el of document.querySelectorAll('.math')) {
  const source = el.querySelector('script[type^="math/tex"]');  // MathJax keeps the TeX there
  const tex = (source ? source.textContent : el.textContent).trim().slice(0, 60);
  const error = el.querySelector('.mjx-merror, .MathJax_Error');
  if (!el.querySelector('.MathJax_CHTML, .MathJax_SVG, .MathJax, .MathJax_Display')) {
    problems.push('math not typeset: ' + tex);
  } else if (error) {
    problems.push('MathJax error "' + error.textContent + '" in: ' + tex);
  } else if (/\\[()\[\]]|\$\$/.test(el.innerText)) {
    problems.push('raw TeX left in math: ' + el.innerText.trim().slice(0, 60));
  }
}
return [problems, embedded];
"""


# The resolved href of every link of the page (the browser resolves relative links against the page).
LINKS = "return Array.from(document.querySelectorAll('a[href]'), (a) => a.href);"


class _Anchors(HTMLParser):
    """Collects the id and name attributes of a page: the anchors a #fragment may point to."""

    def __init__(self):
        super().__init__()
        self.anchors = set()

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("id", "name") and value:
                self.anchors.add(value)


_anchor_cache = {}


def anchors_of(path):
    """The anchors of the HTML file at `path` (read once)."""
    if path not in _anchor_cache:
        parser = _Anchors()
        parser.feed(path.read_text(encoding="utf-8", errors="replace"))
        _anchor_cache[path] = parser.anchors
    return _anchor_cache[path]


def broken_links(hrefs):
    """The problems of a page's links to local files: a missing file, or a missing #anchor in an HTML file."""
    problems = []
    for href in dict.fromkeys(hrefs):  # each link once, in page order
        url = urlparse(href)
        if url.scheme != "file":
            continue  # links out of the book are not checked (the book is read offline)
        target = Path(unquote(url.path))
        if not target.exists():
            problems.append(f"broken link: {href} (no such file)")
        elif url.fragment and target.suffix == ".html" and unquote(url.fragment) not in anchors_of(target):
            problems.append(f"broken link: {href} (no #{unquote(url.fragment)} on that page)")
    return problems


# Waits for Sphinx's search to finish (its status line says so) and returns the number of results.
WAIT_FOR_SEARCH = """
const done = arguments[arguments.length - 1];
const timer = setInterval(() => {
  const status = document.querySelector('#search-results .search-summary');
  if (status && status.textContent.trim()) {
    clearInterval(timer);
    done(document.querySelectorAll('#search-results ul.search li').length);
  }
}, 100);
"""


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--html", type=Path, default=Path("build/book/html"), help="the rendered book")
    parser.add_argument("--pages", nargs="+", help="pages to check, relative to --html (default: all)")
    parser.add_argument("--search", default="attention", metavar="WORD",
                        help="a word of the book that search.html must find (default: %(default)s)")
    parser.add_argument("--screenshot", type=Path, metavar="DIR", help="save a full-page PNG of each page here")
    return parser.parse_args()


def start_browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(MATHJAX_TIMEOUT_S + 10)
    return driver


def save_screenshot(driver, path):
    """A PNG of the whole page, beyond the window's height."""
    width, height = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight];")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


def check_page(driver, url):
    """The problems of one page, as messages."""
    driver.get_log("browser")  # drop what earlier pages left
    try:
        driver.get(url)
    except Exception as error:  # a timeout or a browser error: the page did not load
        return [f"page did not load: {error}".splitlines()[0]]
    if driver.execute_script("return document.body === null || document.body.children.length === 0"):
        return ["page did not load (empty body)"]
    problems = []
    mathjax = driver.execute_async_script(WAIT_FOR_MATHJAX, MATHJAX_TIMEOUT_S)
    if mathjax == "missing":
        problems.append("page has math but does not load MathJax")
    elif mathjax == "timeout":
        problems.append(f"MathJax did not finish within {MATHJAX_TIMEOUT_S} s")
    found, embedded = driver.execute_script(FIND_PROBLEMS)
    problems += found
    problems += broken_links(driver.execute_script(LINKS))
    for url in embedded:
        if not (url.startswith("file://") and Path(unquote(urlparse(url).path)).is_file()):
            problems.append(f"embedded resource missing: {url}")
    problems += [f"console: {entry['message']}" for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    return problems


def check_search(driver, url, term):
    """The problems of a search for `term`, which the book must contain."""
    driver.get_log("browser")
    driver.get(f"{url}?q={quote(term)}")
    try:
        found = driver.execute_async_script(WAIT_FOR_SEARCH)
        problems = [] if found else [f"search for '{term}' found nothing"]
    except TimeoutException:
        problems = [f"search for '{term}' did not finish"]
    problems += [f"console: {entry['message']}" for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    return problems


def main():
    args = parse_args()
    html = args.html.resolve()
    if not (html / "index.html").is_file():
        print(f"check_pages: skipped, the book is not rendered ({html}/index.html missing): build the target `book`")
        return SKIP
    if webdriver is None:
        print("check_pages: selenium is missing: run with /usr/bin/python3 (python3-selenium)", file=sys.stderr)
        return 2
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not Path(tool).exists():
            print(f"check_pages: {tool} is missing: run scripts/install_deps.sh", file=sys.stderr)
            return 2
    pages = args.pages or sorted(str(path.relative_to(html)) for path in html.rglob("*.html"))
    missing = [page for page in pages if not (html / page).is_file()]
    if missing:
        print(f"check_pages: no such page under {html}: {', '.join(missing)}", file=sys.stderr)
        return 2

    driver = start_browser()
    failed = 0
    try:
        for page in pages:
            problems = check_page(driver, (html / page).as_uri())
            if args.screenshot:
                save_screenshot(driver, args.screenshot / (page.replace("/", "_").removesuffix(".html") + ".png"))
            if page == "search.html":
                problems += check_search(driver, (html / page).as_uri(), args.search)
            for problem in problems[:MAX_SHOWN]:
                print(f"FAIL {page}: {problem}")
            if len(problems) > MAX_SHOWN:
                print(f"FAIL {page}: ... and {len(problems) - MAX_SHOWN} more problems")
            failed += bool(problems)
    finally:
        driver.quit()
    print(f"check_pages: {len(pages) - failed} of {len(pages)} pages clean")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
