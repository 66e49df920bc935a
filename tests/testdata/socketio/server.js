// One Socket.IO server of tests/socketio_test.go: `node server.js NAME`
// listens on 127.0.0.1 on a free port and prints "listening <host:port>".
//
// Like a real Socket.IO app it keeps everything in process memory: the
// Engine.IO session (the `sid` that every long-polling request carries)
// and, per connection, a counter that the client's "inc" event increments
// and acknowledges with {server, n, id}. A request whose sid another
// process created fails with Engine.IO's "Session ID unknown" (HTTP 400).
//
// GET /healthz answers 200 (Caddy's health check); GET /stats answers the
// server's figures as JSON. The process exits when its standard input
// closes, so it never outlives the test that started it.
"use strict";
const http = require("node:http");
const { Server } = require("socket.io");

const name = process.argv[2] || "?";
const stats = { server: name, connections: 0, acks: 0, connection_errors: {} };

const httpServer = http.createServer((req, res) => {
  if (req.url === "/healthz") {
    res.writeHead(200, { "content-type": "text/plain" });
    res.end("ok\n");
    return;
  }
  if (req.url === "/stats") {
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify(stats));
    return;
  }
  // Socket.IO answers its own path (/socket.io/) before this handler runs.
  res.writeHead(404);
  res.end();
});

const io = new Server(httpServer, { transports: ["polling"] });

io.engine.on("connection_error", (err) => {
  const key = err.message || String(err.code);
  stats.connection_errors[key] = (stats.connection_errors[key] || 0) + 1;
});

io.on("connection", (socket) => {
  stats.connections++;
  socket.data.n = 0; // per-connection state, in this process only
  socket.on("inc", (ack) => {
    socket.data.n++;
    stats.acks++;
    if (typeof ack === "function") {
      ack({ server: name, n: socket.data.n, id: socket.id });
    }
  });
});

httpServer.listen(0, "127.0.0.1", () => {
  const a = httpServer.address();
  process.stdout.write(`listening ${a.address}:${a.port}\n`);
});

process.stdin.on("end", () => process.exit(0));
process.stdin.on("error", () => process.exit(0));
process.stdin.resume();
