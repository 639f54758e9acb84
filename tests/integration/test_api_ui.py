"""The web UI in a real headless browser (Debian's chromium via Selenium/chromedriver)
against five real nodes, the projector and a real API server process running the
market service.

Two users in two browsers: user A (securities-a) posts the seed's 국민주택 2013-02
sell order; user B (securities-b) joins it, they negotiate in the messenger to
11578.49 x 100, both press 협상확정, the DvP transaction commits and the trade is
confirmed; both balances (나의 잔고 조회) show the change; the regulator then signs in
and sees the trade on the surveillance page. Screenshots go to tests/artifacts/ui/.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.api_fixtures import (
    CASH_A,
    CASH_B,
    ISSUER_VALUE,
    ApiRun,
    api_stack,
    seed_assets,
)
from tests.integration.cluster_fixtures import running_chain

pytestmark = pytest.mark.cluster
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "ui"
WAIT_S = 60.0
PRICE = "11578.49"
AMOUNT = 1_157_849  # 11578.49 x 100

if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("chromium and chromedriver are not installed (apt-get install chromium "
                "chromium-driver; `make test` installs them as root)", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def browser() -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,900", "--lang=ko-KR"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.fixture
def browsers() -> Iterator[tuple[WebDriver, WebDriver]]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    first = browser()
    second = browser()
    try:
        yield first, second
    finally:
        first.quit()
        second.quit()


class Page:
    """One user's browser on the UI."""

    def __init__(self, driver: WebDriver, api: ApiRun, name: str) -> None:
        self.driver, self.api, self.name = driver, api, name

    def wait(self, condition: Callable[[WebDriver], Any], what: str) -> Any:
        return WebDriverWait(self.driver, WAIT_S, poll_frequency=0.2).until(
            condition, message=f"{self.name}: {what}")

    def click(self, css: str) -> None:
        self.wait(lambda d: d.find_element(By.CSS_SELECTOR, css).is_displayed(), css)
        self.driver.find_element(By.CSS_SELECTOR, css).click()

    def type(self, css: str, text: str) -> None:
        element = self.driver.find_element(By.CSS_SELECTOR, css)
        element.clear()
        element.send_keys(text)

    def text(self, css: str) -> str:
        return str(self.driver.find_element(By.CSS_SELECTOR, css).text)

    def login(self, user: str, password: str) -> None:
        self.driver.get(f"{self.api.url}/ui/")
        self.wait(lambda d: d.find_element(By.ID, "login-username").is_displayed(), "login")
        self.type("#login-username", user)
        self.type("#login-password", password)
        self.click("#login-submit")
        self.wait(lambda d: d.find_element(By.ID, "tabs").is_displayed(), "signed in")

    def tab(self, name: str) -> None:
        self.click(f'nav button[data-tab="{name}"]')

    def shot(self, name: str) -> None:
        self.driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def rows_with(page: Page, css: str, text: str) -> bool:
    return any(text in row.text for row in page.driver.find_elements(By.CSS_SELECTOR, css))


def click_through(a: Page, b: Page, passwords: dict[str, str], regulator: str) -> None:
    a.login("user-a", passwords["user-a@securities-a"])
    b.login("user-b", passwords["user-b@securities-b"])
    # 등록·게시: A posts the sell order
    a.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#post-security option"), "assets")
    a.type("#post-price", "11578.50")
    a.type("#post-quantity", "100")
    a.click("#post-submit")
    a.wait(lambda d: rows_with(a, "#board-table tbody tr", "국민주택 2013-02"), "own order")
    a.shot("01-a-posted")
    # 거래참여: B sees it live and joins
    b.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#board-table button.join"), "join button")
    b.shot("02-b-board")
    b.click("#board-table button.join")
    b.wait(lambda d: d.find_element(By.ID, "tab-messenger").is_displayed(), "messenger")
    # 협의: messages both ways, B's offer 11578.49 x 100
    b.type("#message-text", "네~ 이율 0.001만 내려주시면 바로 삽니다.")
    b.type("#offer-price", PRICE)
    b.type("#offer-quantity", "100")
    b.click("#message-send")
    a.tab("messenger")
    a.wait(lambda d: "바로 삽니다" in a.text("#messages"), "B's message at A")
    a.type("#message-text", "좋습니다.")
    a.click("#message-send")
    b.wait(lambda d: "좋습니다." in b.text("#messages"), "A's message at B")
    a.shot("03-a-messenger")
    # 협상확정 by both: the second signature settles (DvP) and confirms the trade
    a.wait(lambda d: d.find_element(By.ID, "agree-price").get_attribute("value") == PRICE,
           "terms filled from the last offer")
    a.click("#agree-submit")
    b.wait(lambda d: "user-a" in b.text("#agree-status") or
           "securities-a" in b.text("#agree-status"), "A's signature seen by B")
    b.wait(lambda d: d.find_element(By.ID, "agree-price").get_attribute("value") == PRICE,
           "terms at B")
    b.click("#agree-submit")
    b.wait(lambda d: d.find_elements(By.ID, "trade-confirmed"), "trade confirmation")
    b.shot("04-b-confirmed")
    # 거래확인 and 나의 잔고 조회 on both sides
    for page in (a, b):
        page.tab("trades")
        page.wait(lambda d, p=page: rows_with(p, "#trades-table tbody tr", PRICE), "trade row")
        page.tab("balance")
        page.click("#balance-refresh")
    a.wait(lambda d: a.text("#balance-cash") == f"{CASH_A + AMOUNT:,}원", "A's cash")
    assert "국민주택" not in a.text("#balance-table")
    b.wait(lambda d: "국민주택 2013-02" in b.text("#balance-table") and
           "100주" in b.text("#balance-table"), "B's bond")
    assert b.text("#balance-cash") == f"{CASH_B - AMOUNT:,}원"
    a.shot("05-a-balance")
    b.shot("06-b-balance")
    # the regulator's surveillance page and the chain explorer
    a.click("#logout")
    a.login("regulator", regulator)
    a.wait(lambda d: rows_with(a, "#surveillance-trades tbody tr", PRICE), "surveillance")
    a.shot("07-regulator-surveillance")
    a.tab("explorer")
    a.wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#nodes-table tbody tr")) == 5,
           "five nodes")
    a.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "#blocks-table tbody tr"), "blocks")
    a.click("#lang")
    a.wait(lambda d: a.text('nav button[data-tab="explorer"]') == "Chain explorer", "English")
    a.shot("08-regulator-explorer-english")


async def test_two_users_trade_in_the_browser(kafka_bootstrap: str, unique_id: str,
                                              pg_dsn: str, tmp_path: Path,
                                              browsers: tuple[WebDriver, WebDriver]) -> None:
    async with running_chain(tmp_path, unique_id, kafka_bootstrap, lane_count=1,
                             issuer_value=ISSUER_VALUE) as run, \
            api_stack(run, pg_dsn, tmp_path, market=True) as api:
        await seed_assets(api)
        a, b = (Page(driver, api, name) for driver, name in zip(browsers, "AB", strict=True))
        await asyncio.to_thread(click_through, a, b, api.credentials["custodial_users"],
                                api.secret("user", "regulator"))
