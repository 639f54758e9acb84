// capital-ledger web UI: plain JavaScript against the platform API (no build step).
"use strict";

const TEXT = {
  ko: {title: "자본시장 블록체인 장외거래", login: "로그인", logout: "로그아웃", username: "사용자",
    password: "비밀번호", board: "게시판", messenger: "메신저", balance: "나의 잔고 조회",
    trades: "거래확인", explorer: "블록 탐색기", surveillance: "시장감시", time: "시간",
    security: "종목명", maturity: "만기일", side: "구분", price: "단가", quantity: "수량",
    poster: "게시자", status: "상태", join: "거래참여", sell: "매도", buy: "매수", post: "게시",
    amend: "정정", cancel: "취소", message: "메시지", offerPrice: "제시 단가",
    offerQuantity: "제시 수량", send: "보내기", agree: "협상확정", lookup: "조회",
    seller: "매도자", buyer: "매수자", height: "높이", nodes: "노드 상태", blocks: "블록",
    institution: "기관", state: "상태", head: "헤드", hash: "해시", proposer: "제안자",
    voters: "투표자", txs: "거래 수", allOrders: "전체 호가", refused: "거부된 명령",
    cash: "원화", units: "주", waiting: "대기", negotiating: "협의중", agreed: "확정",
    settled: "체결", cancelled: "취소", expired: "만료", posterRole: "게시자",
    joinerRole: "참여자", signedBy: "서명", committed: "체결 완료: 블록",
    lang: "English"},
  en: {title: "Capital-market ledger OTC", login: "Sign in", logout: "Sign out",
    username: "User", password: "Password", board: "Board", messenger: "Messenger",
    balance: "My balance", trades: "Trade confirmation", explorer: "Chain explorer",
    surveillance: "Surveillance", time: "Time", security: "Security", maturity: "Maturity",
    side: "Side", price: "Price", quantity: "Quantity", poster: "Poster", status: "Status",
    join: "Join", sell: "Sell", buy: "Buy", post: "Post", amend: "Amend", cancel: "Cancel",
    message: "Message", offerPrice: "Offer price", offerQuantity: "Offer quantity",
    send: "Send", agree: "Agree", lookup: "Look up", seller: "Seller", buyer: "Buyer",
    height: "Height", nodes: "Nodes", blocks: "Blocks", institution: "Institution",
    state: "State", head: "Head", hash: "Hash", proposer: "Proposer", voters: "Voters",
    txs: "Txs", allOrders: "All orders", refused: "Refused commands", cash: "KRW",
    units: "units", waiting: "waiting", negotiating: "negotiating", agreed: "agreed",
    settled: "settled", cancelled: "cancelled", expired: "expired", posterRole: "Poster",
    joinerRole: "Joiner", signedBy: "signed by", committed: "Committed: block",
    lang: "한국어"},
};
const POLL_MS = 1000;
const state = {lang: localStorage.getItem("lang") || "ko", token: sessionStorage.getItem("token"),
  scope: sessionStorage.getItem("scope"), user: sessionStorage.getItem("user"),
  tab: "board", version: -1, negotiation: null, assets: []};

const $ = (selector) => document.querySelector(selector);
const t = (key) => (TEXT[state.lang][key] || key);
const esc = (value) => String(value ?? "").replace(/[&<>"']/g,
  (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));

function newKey() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return "k" + Date.now() + "-" + Math.random().toString(16).slice(2);
}

async function api(path, options = {}) {
  const headers = {"Content-Type": "application/json"};
  if (state.token) headers.Authorization = "Bearer " + state.token;
  if (options.method === "POST") headers["Idempotency-Key"] = newKey();
  const response = await fetch(path, {...options, headers});
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    if (response.status === 401 && state.token) logout();
    throw new Error(`${body.code || response.status}: ${body.detail || ""}`);
  }
  $("#error").textContent = "";
  return body;
}

function showError(error) { $("#error").textContent = String(error.message || error); }

function translate() {
  document.documentElement.lang = state.lang;
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-placeholder]").forEach(
    (el) => { el.placeholder = t(el.dataset.i18nPlaceholder); });
  $("#lang").textContent = t("lang");
  document.title = t("title");
}

async function login(event) {
  event.preventDefault();
  try {
    const answer = await api("/api/login", {method: "POST", body: JSON.stringify({
      username: $("#login-username").value, password: $("#login-password").value})});
    state.token = answer.access_token; state.scope = answer.scope;
    state.user = $("#login-username").value;
    sessionStorage.setItem("token", state.token); sessionStorage.setItem("scope", state.scope);
    sessionStorage.setItem("user", state.user);
    enter();
  } catch (error) { showError(error); }
}

function logout() {
  state.token = null; sessionStorage.clear();
  $("#login-view").hidden = false; $("#tabs").hidden = true; $("#logout").hidden = true;
  document.querySelectorAll(".tab").forEach((el) => { el.hidden = true; });
  $("#whoami").textContent = "";
}

function enter() {
  $("#login-view").hidden = true; $("#tabs").hidden = false; $("#logout").hidden = false;
  $("#whoami").textContent = `${state.user} (${state.scope})`;
  const regulator = state.scope === "regulator" || state.scope === "platform";
  document.querySelector('[data-tab="surveillance"]').hidden = !regulator;
  show(regulator ? "surveillance" : "board");
}

function show(tab) {
  state.tab = tab;
  document.querySelectorAll(".tab").forEach((el) => { el.hidden = el.id !== "tab-" + tab; });
  document.querySelectorAll("nav button").forEach(
    (el) => el.classList.toggle("active", el.dataset.tab === tab));
  refresh(true);
}

function time(ms) { return new Date(ms).toLocaleTimeString(state.lang === "ko" ? "ko-KR" : "en-GB",
  {hour: "2-digit", minute: "2-digit"}); }

async function loadAssets() {
  if (state.assets.length) return;
  state.assets = (await api("/api/market/assets")).items;
  $("#post-security").innerHTML = state.assets.filter((a) => a.kind === "bond").map(
    (a) => `<option value="${esc(a.security_code)}">${esc(a.name)}</option>`).join("");
}

async function renderBoard() {
  await loadAssets();
  const board = await api("/api/market/board");
  const me = state.scope === "user";
  $("#board-table tbody").innerHTML = board.items.map((o) => {
    let action = "";
    if (o.mine) {
      action = `<button class="amend" data-order="${esc(o.order_id)}">${t("amend")}</button>` +
        `<button class="cancel" data-order="${esc(o.order_id)}">${t("cancel")}</button>`;
    } else if (me && o.status === "waiting") {
      action = `<button class="join" data-order="${esc(o.order_id)}">${t("join")}</button>`;
    }
    return `<tr data-order="${esc(o.order_id)}"><td>${time(o.posted_at_ms)}</td><td>${esc(o.name)}</td>` +
      `<td>${esc(o.maturity)}</td><td>${t(o.side)}</td><td>${esc(o.price)}</td>` +
      `<td>${o.quantity}</td><td>${esc(o.poster.user_id)}</td>` +
      `<td class="status-${esc(o.status)}">${t(o.status)}</td><td>${action}</td></tr>`;
  }).join("");
}

async function renderNegotiations() {
  const found = (await api("/api/market/negotiations")).items;
  if (!state.negotiation && found.length) state.negotiation = found[0].negotiation_id;
  $("#negotiations").innerHTML = found.map((n) =>
    `<li data-negotiation="${esc(n.negotiation_id)}" class="${n.negotiation_id === state.negotiation ? "selected" : ""}">` +
    `${esc(n.order ? n.order.name : n.order_id)} — ${esc(n.poster.user_id)} / ${esc(n.joiner.user_id)}</li>`).join("");
  const current = found.find((n) => n.negotiation_id === state.negotiation);
  if (!current) { $("#messages").innerHTML = ""; return; }
  $("#parties").innerHTML = `${t("posterRole")}: ${esc(current.poster.user_id)} · ${t("joinerRole")}: ${esc(current.joiner.user_id)}`;
  $("#agree-security").textContent = current.order ? current.order.name : "";
  const messages = (await api(`/api/market/negotiations/${current.negotiation_id}/messages`)).items;
  $("#messages").innerHTML = messages.map((m) => {
    const role = m.sender.endsWith("/" + current.poster.user_id) ? t("posterRole") : t("joinerRole");
    const offer = m.offer_price ? ` [${esc(m.offer_price)} × ${m.offer_quantity}]` : "";
    return `<div class="message ${m.mine ? "mine" : ""}">${role} : ${esc(m.text)}${offer}</div>`;
  }).join("");
  const last = [...messages].reverse().find((m) => m.offer_price);
  if (last && !$("#agree-price").value) {
    $("#agree-price").value = last.offer_price; $("#agree-quantity").value = last.offer_quantity;
  }
  const agreements = (await api("/api/market/agreements")).items.filter(
    (a) => a.terms.negotiation_id === current.negotiation_id);
  $("#agree-status").innerHTML = agreements.map((a) => `${t("agree")}: ${esc(a.terms.price)} × ${a.terms.quantity} — ` +
    `${t("signedBy")} ${a.signed_by.map(esc).join(", ")}` +
    (a.settled_txid ? ` — <span class="status-settled">${t("settled")}</span>` : "")).join("<br>");
}

async function renderBalance() {
  const found = await api("/api/market/balance");
  const names = Object.fromEntries(state.assets.map((a) => [a.security_code, a.name]));
  const rows = Object.entries(found.securities).map(
    ([code, units]) => `<tr><td>${esc(names[code] || code)}</td><td class="units">${units}${t("units")}</td></tr>`);
  rows.push(`<tr><td>${t("cash")}</td><td id="balance-cash">${Number(found.cash_krw).toLocaleString("ko-KR")}원</td></tr>`);
  $("#balance-table tbody").innerHTML = rows.join("");
}

function tradeRow(trade) {
  return `<tr><td>${esc(trade.terms.security_code)}</td><td>${esc(trade.terms.price)}</td>` +
    `<td>${trade.terms.quantity}</td><td>${esc(trade.terms.seller.user_id)}</td>` +
    `<td>${esc(trade.terms.buyer.user_id)}</td><td>${trade.height}</td>` +
    `<td class="mono">${esc(trade.txid.slice(0, 16))}…</td></tr>`;
}

async function renderTrades() {
  $("#trades-table tbody").innerHTML = (await api("/api/market/trades")).items.map(tradeRow).join("");
}

async function renderExplorer() {
  const status = await api("/api/chain/status");
  $("#nodes-table tbody").innerHTML = status.nodes.map((n) =>
    `<tr><td>${esc(n.institution)}</td><td>${esc(n.state)}</td><td>${n.height ?? ""}</td>` +
    `<td class="mono">${esc((n.head_hash || "").slice(0, 16))}</td></tr>`).join("");
  const blocks = (await api("/api/chain/blocks?limit=20")).items;
  $("#blocks-table tbody").innerHTML = blocks.map((b) =>
    `<tr><td>${b.height}</td><td class="mono">${esc(b.hash.slice(0, 16))}…</td><td>${esc(b.proposer)}</td>` +
    `<td>${b.voters.map(esc).join(", ")}</td><td>${b.tx_count}</td><td>${esc(b.time)}</td></tr>`).join("");
}

async function renderSurveillance() {
  const view = await api("/api/market/surveillance");
  $("#surveillance-summary").textContent =
    `${t("allOrders")}: ${view.orders.length} · ${t("trades")}: ${view.trades.length} · events: ${view.events}`;
  $("#surveillance-orders tbody").innerHTML = view.orders.map((o) =>
    `<tr><td>${esc(o.name)}</td><td>${t(o.side)}</td><td>${esc(o.price)}</td><td>${o.quantity}</td>` +
    `<td>${esc(o.poster.key)}</td><td class="status-${esc(o.status)}">${t(o.status)}</td></tr>`).join("");
  $("#surveillance-trades tbody").innerHTML = view.trades.map(tradeRow).join("");
  $("#surveillance-refused tbody").innerHTML = Object.entries(view.refused_by_code).map(
    ([code, count]) => `<tr><td>${esc(code)}</td><td>${count}</td></tr>`).join("");
}

const RENDER = {board: renderBoard, messenger: renderNegotiations, balance: renderBalance,
  trades: renderTrades, explorer: renderExplorer, surveillance: renderSurveillance};

async function refresh(force) {
  if (!state.token) return;
  try {
    if (state.tab === "explorer" || state.tab === "balance") {
      if (force || state.tab === "explorer") await RENDER[state.tab]();
      return;
    }
    const {version} = await api("/api/market/version");
    if (force || version !== state.version) {
      state.version = version;
      await RENDER[state.tab]();
    }
  } catch (error) { showError(error); }
}

async function act(path, body) {
  try {
    const answer = await api(path, {method: "POST", body: JSON.stringify(body || {})});
    await refresh(true);
    return answer;
  } catch (error) { showError(error); return null; }
}

function wire() {
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", logout);
  $("#lang").addEventListener("click", () => {
    state.lang = state.lang === "ko" ? "en" : "ko"; localStorage.setItem("lang", state.lang);
    translate(); refresh(true);
  });
  document.querySelectorAll("nav button").forEach(
    (el) => el.addEventListener("click", () => show(el.dataset.tab)));
  $("#post-form").addEventListener("submit", (event) => {
    event.preventDefault();
    act("/api/market/orders", {security_code: $("#post-security").value, side: $("#post-side").value,
      price: $("#post-price").value, quantity: Number($("#post-quantity").value)});
  });
  $("#board-table").addEventListener("click", async (event) => {
    const order = event.target.dataset.order;
    if (!order) return;
    if (event.target.classList.contains("join")) {
      const negotiation = await act(`/api/market/orders/${order}/join`);
      if (negotiation) { state.negotiation = negotiation.negotiation_id; show("messenger"); }
    } else if (event.target.classList.contains("cancel")) {
      await act(`/api/market/orders/${order}/cancel`);
    } else if (event.target.classList.contains("amend")) {
      const price = window.prompt(t("price"));
      if (price) await act(`/api/market/orders/${order}/amend`, {price});
    }
  });
  $("#negotiations").addEventListener("click", (event) => {
    const item = event.target.closest("li");
    if (item) { state.negotiation = item.dataset.negotiation; $("#agree-price").value = ""; refresh(true); }
  });
  $("#message-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {text: $("#message-text").value};
    if ($("#offer-price").value) body.offer_price = $("#offer-price").value;
    if ($("#offer-quantity").value) body.offer_quantity = Number($("#offer-quantity").value);
    if (await act(`/api/market/negotiations/${state.negotiation}/messages`, body)) {
      $("#message-text").value = ""; $("#offer-price").value = ""; $("#offer-quantity").value = "";
    }
  });
  $("#agree-submit").addEventListener("click", async () => {
    const answer = await act(`/api/market/negotiations/${state.negotiation}/agree`,
      {price: $("#agree-price").value, quantity: Number($("#agree-quantity").value)});
    if (answer && answer.trade) {
      $("#agree-status").innerHTML += `<div id="trade-confirmed" class="status-settled">` +
        `${t("committed")} ${answer.trade.height} (${esc(answer.trade.txid.slice(0, 16))}…)</div>`;
    }
  });
  $("#balance-refresh").addEventListener("click", () => renderBalance().catch(showError));
}

wire();
translate();
if (state.token) enter();
setInterval(() => refresh(false), POLL_MS);
