// A tiny HTTP API for the example services.d: it answers with who it is, and
// 200 on /healthz for the supervisor's health check. With `socket = true` the
// supervisor passes the listening socket as descriptor 3 (systemd's socket
// activation: LISTEN_FDS, LISTEN_PID); otherwise it listens on the port seaport
// appends as its last argument.
'use strict';
const http = require('http');

const port = Number(process.argv[process.argv.length - 1]);
const passed = process.env.LISTEN_FDS === '1' && process.env.LISTEN_PID === String(process.pid);
const server = http.createServer((req, res) => {
  if (req.url === '/healthz') {
    res.end('ok\n');
    return;
  }
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({ service: 'api', port, pid: process.pid, path: req.url }) + '\n');
});
if (passed) {
  server.listen({ fd: 3 }, () => console.log(`api accepting on port ${port} (socket from seaport)`));
} else {
  server.listen(port, '127.0.0.1', () => console.log(`api listening on 127.0.0.1:${port}`));
}

process.on('SIGTERM', () => {
  console.log('api stopping');
  server.close(() => process.exit(0));
  // Keep-alive connections may hold it open; do not wait for them forever.
  setTimeout(() => process.exit(0), 2000).unref();
});
