// A Node seaport 2.0.9 client driven from the Rust interop tests.
// Every line printed is one JSON object, so the tests can parse it.
//
//   node client.js register HUB ROLE META_JSON   register, print it, stay connected
//   node client.js get HUB PATTERN                print "waiting" once synced, then the get() answer
//   node client.js query HUB PATTERN              print the query answer once synced
//   node client.js watch HUB                      print every register and free event
//   node client.js lifecycle HUB ROLE             register, then update its own record
//                                                 (x: 2, registered again), then free it,
//                                                 printing each step
'use strict';
const seaport = require('seaport');

const [mode, hub, arg, extra] = process.argv.slice(2);
const ports = seaport.connect(hub);
const print = (obj) => console.log(JSON.stringify(obj));

ports.on('connect', () => print({ event: 'connect' }));
ports.on('disconnect', () => print({ event: 'disconnect' }));

if (mode === 'register') {
  const meta = registerMeta(arg, JSON.parse(extra || '{}'));
  const announce = () => {
    if (meta.host) print({ event: 'registered', record: meta });
    else setTimeout(announce, 10);
  };
  ports.once('synced', announce);
} else if (mode === 'get') {
  ports.once('synced', () => print({ event: 'waiting' }));
  ports.get(arg, (records) => {
    print({ event: 'found', records });
    ports.close();
  });
} else if (mode === 'query') {
  ports.once('synced', () => {
    print({ event: 'query', records: ports.query(arg) });
    ports.close();
  });
} else if (mode === 'watch') {
  ports.on('register', (record) => print({ event: 'register', record }));
  ports.on('free', (record) => print({ event: 'free', record }));
  ports.on('synced', () => print({ event: 'synced' }));
} else if (mode === 'lifecycle') {
  const meta = registerMeta(arg, { x: 1 });
  ports.once('synced', function announce () {
    if (!meta.host) return setTimeout(announce, 10);
    print({ event: 'registered', record: meta });
    setTimeout(() => {
      // 2.0.9's set() of an own record changes it only locally; registering
      // it again with the same id is how such a client updates it.
      const updated = ports.registerMeta(Object.assign({}, meta, { x: 2 }));
      print({ event: 'set' });
      setTimeout(() => {
        ports.free(updated);
        print({ event: 'freed' });
      }, 300);
    }, 300);
  });
} else {
  console.error('unknown mode ' + mode);
  process.exit(2);
}

function registerMeta(role, meta) {
  return ports.registerMeta(role, meta);
}
