"""Drives cifar-df's dashboard in headless Chromium (selenium + /usr/bin/chromedriver).

  ui_browser.py --check   exit 0 when chromium, chromedriver and selenium are installed
  ui_browser.py URL       the page at URL, whose runs folder holds a finished run `done`
                          and a run `live` training slowly, must: load with no console
                          error, list both runs, draw curves, show new batches of `live`
                          without a reload, draw the confusion heatmap and the gallery of wrong test
                          images (and a clicked cell's images), answer SQL (and
                          show an SQL error under the box), and keep its settings on reload.
                          First, a link whose address carries `#sql=COPY … TO 'PWNED'`
                          (PWNED: $UI_PWNED) must fill the SQL box and write nothing.
"""
import os
import shutil
import sys
import time


def find(*names):
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    return None


def check():
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return bool(find("chromium", "chromium-browser") and find("chromedriver"))


def main(url):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = find("chromium", "chromium-browser")
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update",
              "--window-size=1300,1600"]:
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(find("chromedriver")), options=opts)
    wait = WebDriverWait(driver, 60, poll_frequency=0.2)
    try:
        # A link with SQL in its address: the box shows it, nothing runs until a person
        # presses Run.
        pwned = os.environ.get("UI_PWNED")
        if pwned:
            from urllib.parse import quote
            copy = f"COPY (select 42 as pwned) TO '{pwned}' STORED AS CSV"
            driver.get(url + "#sql=" + quote(copy))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runs tbody tr")) >= 2)
            assert driver.find_element(By.ID, "sql").get_attribute("value") == copy
            time.sleep(1.5)
            assert not os.path.exists(pwned), "the #sql= link wrote " + pwned
            assert driver.find_element(By.ID, "sql-result").text == ""
            print("#sql= link: filled the box, ran nothing")
        driver.get(url + "#runs=done,live&metric=acc_mean")
        driver.refresh()
        # The runs list.
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runs tbody tr")) >= 2)
        names = [r.get_attribute("data-run")
                 for r in driver.find_elements(By.CSS_SELECTOR, "#runs tbody tr")]
        assert "done" in names and "live" in names, names

        # Curves drawn, and new batches of the live run arrive without a reload.
        def live_total(d):
            note = d.find_element(By.ID, "curves-note").text
            for part in note.split(" · "):
                if part.startswith("live: "):
                    return int(part.split()[1])
            return -1
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chart canvas"))
        wait.until(lambda d: live_total(d) > 0)
        first = live_total(driver)
        marker = driver.execute_script("window.__same_page = 1; return 1;")
        wait.until(lambda d: live_total(d) > first)
        assert driver.execute_script("return window.__same_page") == marker, "page reloaded"
        print("live batches", first, "->", live_total(driver))

        # Test results and the confusion heatmap of the finished run.
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results tbody tr"))
        driver.execute_script(
            "const s = document.getElementById('confusion-run'); s.value = 'done';"
            "s.dispatchEvent(new Event('change'));")
        wait.until(lambda d: d.find_element(By.ID, "confusion").get_attribute("data-classes") == "10")
        # The gallery: the run's wrong test images, drawn from the data.
        loaded = ("const i = [...document.querySelectorAll('#gallery figure img')];"
                  "return i.length > 0 && i.every((x) => x.complete && x.naturalWidth === 32);")
        wait.until(lambda d: d.execute_script(loaded))
        captions = ("return [...document.querySelectorAll('#gallery figcaption')]"
                    ".map((c) => c.textContent);")
        wrong = driver.execute_script(captions)
        assert wrong and all(a != b for a, b in (c.split(" → ") for c in wrong)), wrong
        print("gallery", len(wrong), "wrong images:", driver.find_element(By.ID, "gallery-note").text)
        # A click on the heatmap's middle (a diagonal cell): that class's right images.
        driver.find_element(By.ID, "confusion").click()
        wait.until(lambda d: "actual" in d.find_element(By.ID, "cell").text)
        wait.until(lambda d: "right" in d.find_element(By.ID, "gallery-note").text)
        wait.until(lambda d: d.execute_script(loaded))
        right = driver.execute_script(captions)
        assert right and all(c.split(" → ")[0] == c.split(" → ")[1] for c in right), right

        # SQL: rows, then an error under the box.
        box = driver.find_element(By.ID, "sql")
        box.clear()
        box.send_keys("select run, count(*) as n from metrics group by run order by run")
        driver.find_element(By.ID, "sql-run").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sql-table tr")) == 3)
        box.clear()
        box.send_keys("select nope from metrics")
        driver.find_element(By.ID, "sql-run").click()
        wait.until(lambda d: "nope" in d.find_element(By.ID, "sql-error").text)

        # Settings survive a reload.
        driver.refresh()
        wait.until(lambda d: d.find_element(By.ID, "metric").get_attribute("value") == "acc_mean")
        assert driver.find_element(By.ID, "sql").get_attribute("value") == "select nope from metrics"
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#runs tbody tr")) >= 2)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chart canvas"))
        wait.until(lambda d: d.find_element(By.ID, "confusion").get_attribute("data-classes"))

        if os.environ.get("UI_SCREENSHOT"):
            driver.save_screenshot(os.environ["UI_SCREENSHOT"])
        errors = [e for e in driver.get_log("browser")
                  if e["level"] == "SEVERE" and "/api/sql" not in e["message"]]
        assert not errors, errors
        print("ok")
    finally:
        driver.quit()


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if check() else 1)
    main(sys.argv[1])
