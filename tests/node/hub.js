// A Node seaport 2.0.9 hub on a free port, peered to another hub with server.peer().
//
//   node hub.js PEER_HUB    print {"event":"listening","port":N}, then peer with PEER_HUB
'use strict';
const seaport = require('seaport');

const [peer] = process.argv.slice(2);
const server = seaport.createServer();
server.on('register', (record) => console.log(JSON.stringify({ event: 'register', record })));
server.on('free', (record) => console.log(JSON.stringify({ event: 'free', record })));
server.listen(0, '127.0.0.1', () => {
  console.log(JSON.stringify({ event: 'listening', port: server.address().port }));
  server.peer(peer);
});
