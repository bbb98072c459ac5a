// envfleet dashboard: polls /api/status once a second and draws what it says. No dependencies.
(() => {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const WINDOW_S = 120; // seconds of history the chart shows
  const ui = { paused: false, timer: 0, status: null, failures: 0, interval: 1000 };
  const integer = new Intl.NumberFormat("en", { maximumFractionDigits: 0 });
  const decimal = new Intl.NumberFormat("en", { maximumFractionDigits: 1 });

  function rate(x) {
    if (x === null || x === undefined) return "—";
    return x >= 100 ? integer.format(x) : decimal.format(x);
  }

  function ms(x) {
    if (x === null || x === undefined) return "—";
    return `${x >= 100 ? integer.format(x) : Number(x.toPrecision(3))} ms`;
  }

  function duration(s) {
    if (s === null || s === undefined) return "unknown";
    s = Math.round(s);
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ${s % 60} s`;
    return `${Math.floor(m / 60)} h ${m % 60} min`;
  }

  /** Set text only when it changed, so the live region announces changes, not repaints. */
  function put(id, text) {
    const node = $(id);
    if (node.textContent !== text) node.textContent = text;
  }

  // ------------------------------------------------------------------ polling

  function schedule(delay) {
    clearTimeout(ui.timer);
    if (!ui.paused) ui.timer = setTimeout(poll, delay);
  }

  async function poll() {
    let status;
    try {
      const response = await fetch("/api/status", { cache: "no-store", headers: { accept: "application/json" } });
      if (!response.ok) throw new Error(`status ${response.status}`);
      status = await response.json();
    } catch (err) {
      ui.failures += 1;
      put("connection", `Disconnected: the run has ended or the dashboard stopped (${err.message}). Showing the last values.`);
      document.body.dataset.live = "false";
      schedule(Math.min(10000, 2000 * ui.failures));
      return;
    }
    ui.failures = 0;
    ui.interval = Math.max(250, (status.interval_s || 1) * 1000);
    document.body.dataset.live = "true";
    if (!ui.paused) render(status);
    schedule(ui.interval);
  }

  function setPaused(paused) {
    ui.paused = paused;
    const button = $("pause");
    button.setAttribute("aria-pressed", String(paused));
    button.textContent = paused ? "Resume updates" : "Pause updates";
    if (paused) {
      clearTimeout(ui.timer);
      put("connection", "Paused: press p or Resume updates to continue.");
    } else {
      poll();
    }
  }

  // ------------------------------------------------------------------ rendering

  function render(s) {
    ui.status = s;
    const pool = s.pool ? `, ${s.pool.n} envs on ${s.pool.servers} server${s.pool.servers === 1 ? "" : "s"}` : "";
    put("connection", `Live: rollout ${s.command}${pool}, up ${duration(s.uptime_s)}`);
    put("command", s.command);
    put("phase", `· ${s.phase}`);
    put("n-steps-rate", rate(s.rates.steps_per_s));
    put("n-episodes-rate", rate(s.rates.episodes_per_s));
    put("n-steps", integer.format(s.totals.steps));
    put("n-episodes", integer.format(s.totals.episodes));
    put("n-errors", integer.format(s.totals.errors));
    put("n-server-errors", integer.format(s.server_errors));
    const episode = s.latency.kind === "episode";
    put("n-p50-label", episode ? "Episode time p50" : "Latency p50");
    put("n-p99-label", episode ? "Episode time p99" : "Latency p99");
    put("n-p50", ms(s.latency.p50_ms));
    put("n-p99", ms(s.latency.p99_ms));
    put(
      "latency-note",
      episode
        ? `Wall time of whole episodes (reset to the end), over the last ${integer.format(s.latency.samples)} episodes.`
        : `Time of one step call as the client sees it, over the last ${integer.format(s.latency.samples)} calls.`,
    );
    renderEval(s.eval);
    renderServers(s.servers);
    drawChart(s.history);
  }

  function renderEval(progress) {
    $("eval").hidden = !progress;
    if (!progress) return;
    const bar = $("eval-progress");
    bar.max = Math.max(1, progress.total);
    bar.value = progress.done;
    const pct = Math.floor(progress.fraction * 1000) / 10;
    const eta = progress.done >= progress.total ? "done" : `about ${duration(progress.eta_s)} left`;
    put("eval-text", `${integer.format(progress.done)} of ${integer.format(progress.total)} episodes (${pct}%), ${eta}`);
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function renderServers(servers) {
    const body = $("servers").tBodies[0];
    if (!servers.length) return;
    const rows = servers.map((server) => {
      const tr = document.createElement("tr");
      tr.dataset.state = server.state;
      tr.append(
        cell(server.url, "url"),
        cell(server.state, `state state-${server.state}`),
        cell(server.sessions === null ? "—" : integer.format(server.sessions), "num"),
        cell(rate(server.steps_per_s), "num"),
        cell(server.errors === null ? "—" : integer.format(server.errors), "num"),
        cell(server.problem || ""),
      );
      return tr;
    });
    const fresh = rows.map((r) => r.textContent).join("\n");
    if (body.dataset.text !== fresh) {
      body.replaceChildren(...rows);
      body.dataset.text = fresh;
    }
  }

  // ------------------------------------------------------------------ chart

  function niceCeil(x) {
    if (!(x > 0)) return 1;
    const power = 10 ** Math.floor(Math.log10(x));
    for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= x) return step * power;
    return 10 * power;
  }

  function short(x) {
    if (x >= 1e6) return `${Number((x / 1e6).toPrecision(3))}M`;
    if (x >= 1e3) return `${Number((x / 1e3).toPrecision(3))}k`;
    return String(Number(x.toPrecision(3)));
  }

  function drawChart(history) {
    const canvas = $("chart");
    const css = getComputedStyle(document.documentElement);
    const color = (name) => css.getPropertyValue(name).trim();
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = "12px system-ui, 'DejaVu Sans', sans-serif";

    const last = history.length ? history[history.length - 1].t : 0;
    const shown = history.filter((p) => p.t >= last - WINDOW_S);
    const t0 = Math.max(0, last - WINDOW_S);
    const t1 = Math.max(t0 + 10, last);
    const stepsMax = niceCeil(Math.max(0, ...shown.map((p) => p.steps_per_s)));
    const episodesMax = niceCeil(Math.max(0, ...shown.map((p) => p.episodes_per_s)));
    const pad = { left: 56, right: 56, top: 10, bottom: 28 };
    const plotW = Math.max(10, width - pad.left - pad.right);
    const plotH = Math.max(10, height - pad.top - pad.bottom);
    const x = (t) => pad.left + ((t - t0) / (t1 - t0)) * plotW;
    const y = (v, max) => pad.top + plotH - (v / max) * plotH;

    // grid and axes
    ctx.strokeStyle = color("--line");
    ctx.fillStyle = color("--muted");
    ctx.lineWidth = 1;
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const gy = Math.round(pad.top + (plotH * i) / 4) + 0.5;
      ctx.beginPath();
      ctx.moveTo(pad.left, gy);
      ctx.lineTo(pad.left + plotW, gy);
      ctx.stroke();
      ctx.textAlign = "right";
      ctx.fillText(short((stepsMax * (4 - i)) / 4), pad.left - 6, gy);
      ctx.textAlign = "left";
      ctx.fillText(short((episodesMax * (4 - i)) / 4), pad.left + plotW + 6, gy);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const tick = niceCeil((t1 - t0) / 6);
    for (let t = Math.ceil(t0 / tick) * tick; t <= t1; t += tick) {
      ctx.fillText(`${Math.round(t)} s`, x(t), pad.top + plotH + 6);
    }

    // series
    const line = (key, max, stroke, dash) => {
      if (!shown.length) return;
      ctx.strokeStyle = stroke;
      ctx.lineWidth = 2;
      ctx.setLineDash(dash);
      ctx.beginPath();
      shown.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(p[key], max)) : ctx.moveTo(x(p.t), y(p[key], max))));
      ctx.stroke();
      ctx.setLineDash([]);
    };
    line("episodes_per_s", episodesMax, color("--episodes"), [6, 4]);
    line("steps_per_s", stepsMax, color("--steps"), []);

    canvas.dataset.points = String(history.length);
    const latest = history[history.length - 1];
    const peak = Math.max(0, ...history.map((p) => p.steps_per_s));
    canvas.setAttribute(
      "aria-label",
      latest
        ? `Throughput chart over the last ${Math.round(last - t0)} s: now ${rate(latest.steps_per_s)} steps/s and ` +
            `${rate(latest.episodes_per_s)} episodes/s; peak ${rate(peak)} steps/s.`
        : "Throughput chart: no samples yet",
    );
  }

  // ------------------------------------------------------------------ wiring

  document.addEventListener("DOMContentLoaded", () => {
    $("pause").addEventListener("click", () => setPaused(!ui.paused));
    document.addEventListener("keydown", (event) => {
      if (event.key !== "p" || event.ctrlKey || event.metaKey || event.altKey) return;
      if (event.target instanceof HTMLElement && event.target.closest("input, textarea, select")) return;
      event.preventDefault();
      setPaused(!ui.paused);
    });
    window.addEventListener("resize", () => ui.status && drawChart(ui.status.history));
    drawChart([]);
    poll();
  });
})();
