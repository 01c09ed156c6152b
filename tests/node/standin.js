// Stand-in for the npm package seaport 2.0.9's index.js, used to run that
// package's own test files (node_modules/seaport/test/*.js, unmodified) against
// OUR hub binary. tests/it/upstream.rs lays the files out as X/test/*.js with
// X/index.js requiring this file, so the tests' `require('../')` lands here.
//
// - `connect` and every other export are the real 2.0.9 package's.
// - `createServer(opts)` returns an EventEmitter that runs `$SEAPORT_BIN listen
//   PORT --host 127.0.0.1 [--peer 127.0.0.1:P ...] [--heartbeat MS] [--timeout MS]`.
//   Its server-side view (`query`, `free`, the `register` and `free` events) is a
//   "mirror": a real 2.0.9 client connected to that hub.
// - `listen(port)` is synchronous as far as the caller can tell: port 0 is
//   replaced by a free port found by a synchronous child process, so `address()`
//   answers at once. The hub itself starts at `process.nextTick`, once the calling
//   code has declared its peers with `peer()` (our hub only peers with `--peer` at
//   start), and that tick blocks until the hub has printed its listening line.
//   Clients created in the same tick connect later, because their connection to
//   'localhost' waits for an asynchronous name lookup.
// - Every hub started here is killed when this Node process exits, and when the
//   process that started this one goes away.
'use strict';

var seaport = require('seaport');
var EventEmitter = require('events').EventEmitter;
var childProcess = require('child_process');
var fs = require('fs');
var os = require('os');
var path = require('path');

exports = module.exports = function () {
    return seaport.apply(this, arguments);
};
Object.keys(seaport).forEach(function (key) {
    exports[key] = seaport[key];
});
exports.createServer = createServer;

// How long a hub may take to print its listening line.
var START_DEADLINE_MS = 10000;
// How long a closed hub may take to exit before it is killed.
var CLOSE_GRACE_MS = 2000;

var live = []; // hub child processes not yet exited
var pending = []; // servers that called listen() and wait for the next tick
var byPort = {}; // port -> server, for the servers of this process
var tmpDir = null;

process.on('exit', function () {
    killAll();
    if (tmpDir) {
        try { fs.rmSync(tmpDir, { recursive: true, force: true }); } catch (e) {}
    }
});

// When the process that started this one dies (this one is reparented), do not
// leave hubs behind.
var parentPid = process.ppid;
setInterval(function () {
    if (process.ppid !== parentPid) {
        killAll();
        process.exit(1);
    }
}, 500).unref();

function killAll () {
    live.forEach(function (child) {
        try { child.kill('SIGKILL'); } catch (e) {}
    });
}

function createServer (opts) {
    if (!opts) opts = {};
    if (opts.private || opts.public || opts.authorized) {
        throw new Error('seaport stand-in: 2.0.9\'s signed mode (keys) is not supported');
    }
    var s = new EventEmitter();
    var port = null;
    var peers = [];
    var child = null;
    var mirror = null;
    var forwarding = true;
    var closed = false;
    var exited = false;

    s.listen = function (p) {
        var cb = arguments[arguments.length - 1];
        if (typeof cb === 'function') s.once('listening', cb);
        if (port !== null) throw new Error('seaport stand-in: listen() called twice');
        port = Number(p) || reservePort();
        byPort[port] = s;
        pending.push(s);
        if (pending.length === 1) process.nextTick(startPending);
        return s;
    };

    s.address = function () {
        if (port === null) return null;
        return { address: '127.0.0.1', family: 'IPv4', port: port };
    };

    s.peer = function () {
        if (child) {
            throw new Error('seaport stand-in: peer() after the hub started; '
                + '`seaport listen` only peers with --peer at start');
        }
        peers.push(peerAddress([].slice.call(arguments)));
    };

    s.query = function (meta) {
        return mirror ? mirror.query(meta) : [];
    };

    s.free = function (meta) {
        if (mirror) mirror.free(meta);
    };

    s.close = function () {
        if (closed) return;
        closed = true;
        var ix = pending.indexOf(s);
        if (ix >= 0) pending.splice(ix, 1);
        // Closing the mirror frees its records, as closing a 2.0.9 server frees
        // the records it knew: those 'free' events still reach the listeners.
        if (mirror) mirror.close();
        forwarding = false;
        if (!child) {
            process.nextTick(s.emit.bind(s, 'close'));
            return;
        }
        if (exited) return;
        child.kill('SIGTERM');
        setTimeout(function () {
            if (!exited) child.kill('SIGKILL');
        }, CLOSE_GRACE_MS).unref();
    };

    // The port numbers of the servers of this process that this one peers with.
    s._peerPorts = function () {
        return peers.map(function (addr) { return Number(addr.split(':').pop()); });
    };

    s._start = function () {
        if (closed) return;
        var args = ['listen', String(port), '--host', '127.0.0.1'];
        peers.forEach(function (addr) { args.push('--peer', addr); });
        if (opts.heartbeat !== undefined) args.push('--heartbeat', String(opts.heartbeat));
        if (opts.timeout !== undefined) args.push('--timeout', String(opts.timeout));

        var out = path.join(scratchDir(), 'hub-' + port + '.out');
        var fd = fs.openSync(out, 'w');
        child = childProcess.spawn(hubBinary(), args, { stdio: ['ignore', fd, 'inherit'] });
        fs.closeSync(fd);
        live.push(child);
        child.on('exit', function (code, signal) {
            exited = true;
            live.splice(live.indexOf(child), 1);
            if (!closed) {
                console.error('seaport stand-in: hub on :' + port + ' exited unexpectedly ('
                    + (signal || 'code ' + code) + ')');
                closed = true;
                forwarding = false;
                if (mirror) mirror.close();
            }
            s.emit('close');
        });
        waitForListening(child, out, port);

        // A client on default settings (heartbeats every 15 s), whatever the
        // hub's: a hub with short heartbeats must not drop it (free_cases.js
        // runs the hub with --heartbeat 50 --timeout 60).
        mirror = seaport.connect(port, '127.0.0.1');
        mirror.on('register', function (meta, id) {
            if (forwarding) s.emit('register', meta, id);
        });
        mirror.on('free', function (meta, id) {
            if (forwarding) s.emit('free', meta, id);
        });
        // The mirror only goes away with the hub: a hub that drops a live
        // client fails the file.
        mirror.on('disconnect', function () {
            if (forwarding) {
                console.error('seaport stand-in: the hub on :' + port
                    + ' dropped a live client (the mirror)');
                process.exitCode = 1;
            }
        });
        s.emit('listening');
    };

    return s;
}

// Starts every server that called listen() in the last tick, each with the peers
// declared by now: servers whose peers already listen go first where the peer
// graph allows (a cycle is broken at the first server; its link retries).
function startPending () {
    while (pending.length) {
        var next = pending.find(function (s) {
            return s._peerPorts().every(function (p) {
                return pending.indexOf(byPort[p]) < 0;
            });
        }) || pending[0];
        pending.splice(pending.indexOf(next), 1);
        next._start();
    }
}

function hubBinary () {
    var bin = process.env.SEAPORT_BIN;
    if (!bin) throw new Error('seaport stand-in: set SEAPORT_BIN to the seaport binary');
    return bin;
}

function scratchDir () {
    if (!tmpDir) tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'seaport-standin-'));
    return tmpDir;
}

// A port that was free a moment ago, found synchronously.
function reservePort () {
    var script = 'var s = require("net").createServer();'
        + 's.listen(0, "127.0.0.1", function () {'
        + ' process.stdout.write(String(s.address().port)); s.close(); });';
    var port = Number(childProcess.execFileSync(process.execPath, ['-e', script], {
        encoding: 'utf8',
    }));
    if (!port) throw new Error('seaport stand-in: could not reserve a port');
    return port;
}

// Blocks until the hub has written `seaport listening on :PORT` to `file`.
function waitForListening (child, file, port) {
    var expected = 'seaport listening on :' + port;
    var deadline = Date.now() + START_DEADLINE_MS;
    var sleeper = new Int32Array(new SharedArrayBuffer(4));
    for (;;) {
        var text = fs.readFileSync(file, 'utf8');
        var nl = text.indexOf('\n');
        if (nl >= 0) {
            var line = text.slice(0, nl);
            if (line !== expected) {
                throw new Error('seaport stand-in: hub printed ' + JSON.stringify(line)
                    + ', expected ' + JSON.stringify(expected));
            }
            return;
        }
        if (gone(child.pid)) {
            throw new Error('seaport stand-in: hub `' + hubBinary() + ' listen ' + port
                + '` exited before listening (see its stderr above)');
        }
        if (Date.now() > deadline) {
            throw new Error('seaport stand-in: hub on :' + port + ' did not print its '
                + 'listening line within ' + START_DEADLINE_MS + ' ms');
        }
        Atomics.wait(sleeper, 0, 0, 5);
    }
}

// Whether process `pid` has exited (it stays a zombie until Node reaps it).
function gone (pid) {
    try {
        var stat = fs.readFileSync('/proc/' + pid + '/stat', 'utf8');
        var state = stat.slice(stat.lastIndexOf(')') + 1).trim()[0];
        return state === 'Z' || state === 'X';
    } catch (e) {
        return true;
    }
}

// The HOST:PORT of a peer() call, whose arguments are read as 2.0.9's connect()
// reads them; 'localhost' becomes 127.0.0.1, where the hubs listen.
function peerAddress (args) {
    var opts = {};
    for (var i = 0; i < args.length; i++) {
        if (typeof args[i] === 'object') {
            opts = args[i];
            args.splice(i, 1);
            break;
        }
    }
    var port = args[0] || opts.port;
    var host = args[1] || opts.host;
    if (typeof port === 'string' && typeof host === 'number') {
        host = args[0];
        port = args[1];
    }
    if (typeof port === 'string' && /:\d+$/.test(port)) {
        host = port.split(':')[0];
        port = port.split(':')[1];
    }
    if (!host || host === 'localhost') host = '127.0.0.1';
    return host + ':' + Number(port);
}
