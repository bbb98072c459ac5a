// The envfleet play page: one WebSocket to the server's OpenEnv endpoint (WS /web/ws, the page's own /ws) is one session.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const token = new URLSearchParams(location.search).get("token");
  const GRID_GAMES = new Set(["catch", "tic_tac_toe", "connect_four"]);
  const PLAYER = { "-1": "chance", "-2": "all players (simultaneous)", "-3": "none", "-4": "none (game over)" };

  function withToken(path) {
    if (!token) return path;
    return `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
  }

  // ------------------------------------------------------------------ the session

  class ServerError extends Error {
    constructor(code, message) {
      super(message);
      this.code = code;
    }
  }

  /** One WS /web/ws connection: requests are answered in order, so replies resolve a FIFO of promises. */
  class Session {
    constructor(onStatus) {
      this.ws = null;
      this.pending = [];
      this.onStatus = onStatus;
    }

    connect() {
      const url = new URL(withToken("/web/ws"), location.href);
      url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
      this.onStatus(`Connecting to ${url.host}…`);
      return new Promise((resolve, reject) => {
        const ws = new WebSocket(url);
        let opened = false;
        ws.onopen = () => {
          opened = true;
          this.ws = ws;
          this.onStatus(`Connected to ${url.host} (one session)`);
          resolve();
        };
        ws.onmessage = (event) => {
          const waiter = this.pending.shift();
          if (!waiter) return;
          let reply;
          try {
            reply = JSON.parse(event.data);
          } catch (err) {
            waiter.reject(new Error(`unreadable reply from the server: ${err.message}`));
            return;
          }
          if (reply.type === "error") {
            const data = reply.data || {};
            waiter.reject(new ServerError(data.code || "ERROR", data.message || "unknown error"));
          } else {
            waiter.resolve(reply);
          }
        };
        ws.onclose = (event) => {
          if (this.ws === ws) this.ws = null;
          const why = `connection closed (code ${event.code}${event.reason ? `: ${event.reason}` : ""})`;
          for (const waiter of this.pending.splice(0)) waiter.reject(new Error(why));
          this.onStatus(opened ? `Disconnected: ${why}. The next Reset reconnects.` : `Cannot connect: ${why}`);
          if (!opened) reject(new Error(`cannot connect to ${url.host}: ${why}`));
        };
      });
    }

    async request(type, data) {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) await this.connect();
      return new Promise((resolve, reject) => {
        this.pending.push({ resolve, reject });
        this.ws.send(JSON.stringify(data === undefined ? { type } : { type, data }));
      });
    }
  }

  // ------------------------------------------------------------------ page state

  const session = new Session((text) => ($("connection").textContent = text));
  const ui = {
    games: new Map(), // name -> catalog entry from /web/games
    game: null, // the game of the running episode
    agent: 0,
    names: new Map(), // legal action id -> name, for the current observation
    historyLength: 0,
    started: false,
    done: false,
    busy: false,
  };

  function setBusy(busy) {
    ui.busy = busy;
    document.body.dataset.busy = String(busy);
    $("reset").disabled = busy;
    $("send-action").disabled = busy;
    for (const button of $("actions").querySelectorAll("button")) button.disabled = busy;
  }

  function showError(err) {
    const isServer = err instanceof ServerError;
    $("error-title").textContent = isServer ? `Server error ${err.code}:` : "Error:";
    $("error-message").textContent = err.message;
    $("error").hidden = false;
    log(isServer ? `Refused (${err.code}): ${err.message}` : `Error: ${err.message}`, "log-error");
  }

  function clearError() {
    $("error").hidden = true;
  }

  function log(text, kind = "") {
    const item = document.createElement("li");
    item.textContent = text;
    if (kind) item.className = kind;
    $("log").append(item);
    item.scrollIntoView({ block: "nearest" });
  }

  function fmt(x) {
    if (x === null || x === undefined) return "—";
    return Number.isInteger(x) ? String(x) : String(Math.round(x * 1e6) / 1e6);
  }

  // ------------------------------------------------------------------ games list

  async function loadGames() {
    let body;
    try {
      const response = await fetch(withToken("/web/games"), { headers: { accept: "application/json" } });
      body = await response.json();
      if (!response.ok) throw new ServerError(body.code || response.status, body.detail || response.statusText);
    } catch (err) {
      showError(err);
      $("reset").disabled = true;
      return;
    }
    const select = $("game");
    const ready = document.createElement("optgroup");
    ready.label = "Playable with default parameters";
    const needy = document.createElement("optgroup");
    needy.label = "Need parameters";
    for (const game of body.games) {
      ui.games.set(game.name, game);
      const option = new Option(game.name === game.long_name ? game.name : `${game.name} (${game.long_name})`, game.name);
      (game.loadable ? ready : needy).append(option);
    }
    select.append(ready, needy);
    const defaults = body.defaults || {};
    select.value = ui.games.has(defaults.game) ? defaults.game : "catch";
    $("opponent").replaceChildren(...body.opponents.map((name) => new Option(name, name)));
    $("opponent").value = defaults.opponent || "random";
    chooseGame(defaults.params && Object.keys(defaults.params).length ? defaults.params : null);
  }

  function chooseGame(params) {
    const game = ui.games.get($("game").value);
    if (!game) return;
    const shown = {};
    for (const [key, value] of Object.entries(params || game.params)) if (value !== null) shown[key] = value;
    $("params").value = JSON.stringify(shown, null, 1).replace(/\n\s*/g, " ");
    const [min, max] = game.players;
    const players = min === max ? `${min} player${min === 1 ? "" : "s"}` : `${min}–${max} players`;
    const notes = [players];
    if (game.simultaneous) notes.push("simultaneous moves");
    if (!game.loadable) notes.push("needs parameters to load");
    $("game-info").textContent = notes.join(", ");
    $("player").max = String(Math.max(0, max - 1));
  }

  // ------------------------------------------------------------------ reset and step

  async function reset() {
    if (ui.busy) return;
    clearError();
    let params;
    try {
      params = JSON.parse($("params").value.trim() || "{}");
      if (params === null || typeof params !== "object" || Array.isArray(params)) throw new Error("not an object");
    } catch (err) {
      showError(new Error(`the parameters must be a JSON object, e.g. {"rows": 8} (${err.message})`));
      $("params").focus();
      return;
    }
    const seedText = $("seed").value.trim();
    const seed = seedText === "" ? null : Number(seedText);
    if (seed !== null && !Number.isInteger(seed)) {
      showError(new Error("the seed must be a whole number, or empty"));
      return;
    }
    const options = {
      game: $("game").value,
      params,
      opponent: $("opponent").value,
      agent_player: Number($("player").value || 0),
      action_names: true,
    };
    setBusy(true);
    try {
      const reply = await session.request("reset", { seed, options });
      ui.game = options.game;
      ui.agent = options.agent_player;
      ui.historyLength = 0;
      ui.started = true;
      $("log").replaceChildren();
      const seedNote = seed === null ? "random seed" : `seed ${seed}`;
      log(`Reset: ${options.game} ${JSON.stringify(params)}, ${seedNote}, opponent ${options.opponent}, you are player ${ui.agent}`);
      render(reply.data, true);
      await refreshState(null, "", "");
    } catch (err) {
      showError(err);
    } finally {
      setBusy(false);
    }
  }

  async function step(actionId) {
    if (ui.busy) return;
    clearError();
    const name = ui.names.get(actionId);
    const label = name === undefined ? `action ${actionId}` : `${name} (${actionId})`;
    const hadFocus = $("actions").contains(document.activeElement);
    const focusIndex = [...$("actions").querySelectorAll("button")].indexOf(document.activeElement);
    setBusy(true);
    try {
      const reply = await session.request("step", { action_id: actionId });
      render(reply.data, false);
      await refreshState(actionId, `You played ${label}`, `reward ${fmt(reply.data.reward)}`);
    } catch (err) {
      showError(err);
    } finally {
      setBusy(false);
    }
    if (hadFocus) {
      const buttons = $("actions").querySelectorAll("button");
      (buttons[Math.min(Math.max(focusIndex, 0), buttons.length - 1)] || $("reset")).focus();
    }
  }

  /** Show the server's view of the episode and log what happened since the last request. */
  async function refreshState(agentAction, played, reward) {
    const reply = await session.request("state");
    const state = reply.data;
    const history = state.history || [];
    $("st-steps").textContent = String(state.step_count);
    $("st-history").textContent = history.length ? history.join(" ") : "—";
    $("st-episode").textContent = state.episode_id || "—";
    const others = history.slice(agentAction === null ? 0 : ui.historyLength + 1);
    const othersText = others.length ? `chance/opponents played ${others.join(", ")}` : "";
    if (agentAction === null) {
      if (othersText) log(`Before your first move, ${othersText}`, "log-other");
    } else {
      log(`${played}${othersText ? `; then ${othersText}` : ""}: ${reward}`);
    }
    ui.historyLength = history.length;
    if (ui.done) log(`Episode over. Your return: ${fmt(Number($("st-return").dataset.value))}`, "log-final");
  }

  // ------------------------------------------------------------------ rendering

  function render(result, afterReset) {
    const obs = result.observation;
    ui.done = Boolean(result.done);
    $("st-game").textContent = ui.game;
    const player = obs.current_player_id;
    $("st-player").textContent =
      player === ui.agent ? `${player} (you)` : player >= 0 ? `${player} (opponent)` : PLAYER[player] || String(player);
    $("st-terminal").textContent = ui.done ? "yes — the episode is over" : "no";
    $("st-reward").textContent = afterReset ? "— (reset)" : fmt(result.reward);
    const ret = obs.returns ? obs.returns[ui.agent] : null;
    $("st-return").textContent = fmt(ret);
    $("st-return").dataset.value = String(ret);
    $("st-opponent").textContent = fmt(obs.opponent_last_action);
    $("board").textContent = obs.text || "(this game gives no text observation)";
    drawGrid(obs.text || "");
    renderActions(obs);
  }

  function renderActions(obs) {
    const box = $("actions");
    ui.names = new Map();
    const legal = obs.legal_actions || [];
    const names = obs.legal_action_names || [];
    if (!legal.length) {
      const note = document.createElement("p");
      note.className = "muted";
      note.textContent = ui.done ? "None: the episode is over. Reset to play again." : "None right now.";
      box.replaceChildren(note);
      return;
    }
    const buttons = legal.map((id, i) => {
      const name = names[i] ?? String(id);
      ui.names.set(id, name);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "action";
      button.dataset.action = String(id);
      button.textContent = name;
      button.title = `action id ${id}`;
      button.disabled = ui.busy;
      if (i < 9) button.setAttribute("aria-keyshortcuts", String(i + 1));
      button.addEventListener("click", () => step(id));
      return button;
    });
    box.replaceChildren(...buttons);
  }

  const SYMBOLS = {
    catch: { o: ["ball", "ball"], x: ["paddle", "paddle"], ".": ["", "empty"] },
    tic_tac_toe: { x: ["x", "X"], o: ["o", "O"], ".": ["", "empty"] },
    connect_four: { x: ["x", "X"], o: ["o", "O"], ".": ["", "empty"] },
  };

  /** Draw catch, tic_tac_toe and connect_four as a grid parsed from their text observation. */
  function drawGrid(text) {
    const grid = $("grid");
    const symbols = SYMBOLS[ui.game];
    const rows = text.split("\n").map((line) => line.trim()).filter((line) => line.length);
    const ok =
      GRID_GAMES.has(ui.game) &&
      rows.length > 0 &&
      rows.every((row) => row.length === rows[0].length && [...row].every((c) => c in symbols));
    if (!ok) {
      grid.hidden = true;
      grid.replaceChildren();
      return;
    }
    grid.style.setProperty("--columns", String(rows[0].length));
    grid.className = `grid grid-${ui.game}`;
    const cells = [];
    const description = [];
    rows.forEach((row, r) => {
      const spoken = [];
      [...row].forEach((c) => {
        const [cls, word] = symbols[c];
        const cell = document.createElement("span");
        cell.className = `cell ${cls}`;
        if (ui.game !== "catch" && c !== ".") cell.textContent = c.toUpperCase();
        cells.push(cell);
        spoken.push(word);
      });
      description.push(`row ${r + 1}: ${spoken.join(", ")}`);
    });
    grid.setAttribute("aria-label", `${ui.game} board, ${rows.length} by ${rows[0].length}; ${description.join("; ")}`);
    grid.replaceChildren(...cells);
    grid.hidden = false;
  }

  // ------------------------------------------------------------------ wiring

  function onKey(event) {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const target = event.target;
    if (target instanceof HTMLElement && target.closest("input, textarea, select")) return;
    if (/^[1-9]$/.test(event.key)) {
      const button = $("actions").querySelectorAll("button")[Number(event.key) - 1];
      if (button && !button.disabled) {
        event.preventDefault();
        button.focus();
        button.click();
      }
    } else if (event.key === "r" || event.key === "R") {
      event.preventDefault();
      reset();
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("setup-form").addEventListener("submit", (event) => {
      event.preventDefault();
      reset();
    });
    $("raw-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("action-id").value.trim();
      const id = Number(value);
      if (value === "" || !Number.isInteger(id)) {
        showError(new Error("enter a whole number as the action id"));
        return;
      }
      step(id);
    });
    $("game").addEventListener("change", () => chooseGame(null));
    $("error-dismiss").addEventListener("click", clearError);
    document.addEventListener("keydown", onKey);
    loadGames();
  });
})();
