// A tiny HTTP API for the example services.d: it listens on the port seaport
// appends as its last argument and answers with who it is.
'use strict';
const http = require('http');

const port = Number(process.argv[process.argv.length - 1]);
http
  .createServer((req, res) => {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ service: 'api', port, pid: process.pid, path: req.url }) + '\n');
  })
  .listen(port, '127.0.0.1', () => console.log(`api listening on 127.0.0.1:${port}`));

process.on('SIGTERM', () => {
  console.log('api stopping');
  process.exit(0);
});
