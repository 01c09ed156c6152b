// The original README's router example's servers: `node examples/version.js
// VERSION` answers every request with "version VERSION", on the port seaport
// appends as its last argument.
'use strict';
const http = require('http');

const version = process.argv[2];
const port = Number(process.argv[process.argv.length - 1]);
http
  .createServer((req, res) => res.end(`version ${version}\n`))
  .listen(port, '127.0.0.1', () => console.log(`version ${version} listening on 127.0.0.1:${port}`));
process.on('SIGTERM', () => process.exit(0));
