// The clients of tests/socketio_test.go:
//
//	node client.js <url> <clients> <emits> <cookies:yes|no>
//
// starts <clients> socket.io-client connections to <url>, all on
// Engine.IO long-polling only (transports: ["polling"]), concurrently.
// Each emits "inc" <emits> times, one after the other, and waits for each
// acknowledgement. With cookies=yes the client keeps cookies as a browser
// does (withCredentials: true gives the Node client a cookie jar); with
// no it sends none.
//
// It prints one JSON object: the totals and, per client, what happened.
// A client is clean when it connected once, got every acknowledgement
// from one server with the counter going 1, 2, ..., <emits>, and saw no
// connect error, disconnect or reconnection attempt before it closed.
// A client gives up after its third connect error or disconnect (it
// reconnects, as Socket.IO does by default, until then), and after 15 s
// in any case; the process exits within 20 s.
"use strict";
const { io } = require("socket.io-client");

const [url, nClients, nEmits, cookies] = [
  process.argv[2],
  Number(process.argv[3] || 30),
  Number(process.argv[4] || 5),
  (process.argv[5] || "yes") === "yes",
];

function runClient(i) {
  return new Promise((resolve) => {
    const r = {
      client: i,
      connects: 0,
      connect_errors: 0,
      disconnects: 0,
      reconnect_attempts: 0,
      acks: 0,
      servers: [],
      bad_counter: 0,
      errors: [],
      clean: false,
    };
    const socket = io(url, {
      transports: ["polling"],
      withCredentials: cookies,
      forceNew: true,
      reconnectionAttempts: 2,
      reconnectionDelay: 100,
      reconnectionDelayMax: 200,
      timeout: 5000,
    });
    let finished = false;
    const finish = () => {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      socket.close();
      r.clean =
        r.connects === 1 &&
        r.connect_errors === 0 &&
        r.disconnects === 0 &&
        r.reconnect_attempts === 0 &&
        r.acks === nEmits &&
        r.bad_counter === 0 &&
        new Set(r.servers).size === 1;
      resolve(r);
    };
    const timer = setTimeout(() => {
      r.errors.push("gave up after 15s");
      finish();
    }, 15000);
    socket.io.on("reconnect_attempt", () => r.reconnect_attempts++);
    socket.io.on("reconnect_failed", () => {
      r.errors.push("reconnect_failed");
      finish();
    });
    const failure = (what) => {
      if (r.errors.length < 3) r.errors.push(what);
      if (r.connect_errors + r.disconnects >= 3) {
        r.errors.push("gave up after 3 errors");
        finish();
      }
    };
    socket.on("connect_error", (err) => {
      if (finished) return;
      r.connect_errors++;
      failure("connect_error: " + err.message);
    });
    socket.on("disconnect", (reason) => {
      if (finished) return;
      r.disconnects++;
      failure("disconnect: " + reason);
    });
    socket.on("connect", async () => {
      r.connects++;
      if (r.connects > 1) return; // a reconnection: the first run's loop goes on or has failed
      for (let k = 1; k <= nEmits; k++) {
        try {
          const a = await socket.timeout(5000).emitWithAck("inc");
          r.acks++;
          r.servers.push(a.server);
          if (a.n !== k) r.bad_counter++;
        } catch (err) {
          if (r.errors.length < 3) r.errors.push(`emit ${k}: ${err.message}`);
          break;
        }
      }
      finish();
    });
  });
}

(async () => {
  const start = Date.now();
  const results = await Promise.all(Array.from({ length: nClients }, (_, i) => runClient(i)));
  const sum = (f) => results.reduce((s, r) => s + f(r), 0);
  const perServer = {};
  for (const r of results) {
    if (r.servers.length) perServer[r.servers[0]] = (perServer[r.servers[0]] || 0) + 1;
  }
  const out = {
    clients: nClients,
    emits: nEmits,
    cookies,
    clean_clients: sum((r) => (r.clean ? 1 : 0)),
    failed_clients: sum((r) => (r.clean ? 0 : 1)),
    acks: sum((r) => r.acks),
    connect_errors: sum((r) => r.connect_errors),
    disconnects: sum((r) => r.disconnects),
    reconnect_attempts: sum((r) => r.reconnect_attempts),
    mixed_servers: sum((r) => (new Set(r.servers).size > 1 ? 1 : 0)),
    bad_counters: sum((r) => r.bad_counter),
    clients_per_server: perServer,
    elapsed_ms: Date.now() - start,
    failed_samples: results.filter((r) => !r.clean).slice(0, 5),
  };
  process.stdout.write(JSON.stringify(out) + "\n");
  process.exit(0);
})();
setTimeout(() => {
  process.stderr.write("client.js: still running after 20s, giving up\n");
  process.exit(2);
}, 20000).unref();
