// The original README's "http router" example, as written there for seaport
// 2.0.9 and bouncy 3.2.2, with its two ports taken from the command line:
// `node bouncy-router.js ROUTER_PORT HUB_PORT` (NODE_PATH names tests/node's
// node_modules). It prints one line once both listen.
var seaport = require('seaport');
var server = seaport.createServer();
var bouncy = require('bouncy');

var port = Number(process.argv[2]);
var hubPort = Number(process.argv[3]);

bouncy(function (req, bounce) {
    var domains = (req.headers.host || '').split('.');
    var service = 'http@' + ({
        unstable : '0.1.x',
        stable : '0.0.x'
    }[domains[0]] || '0.0.x');
    var ps = server.query(service);
    if (ps.length === 0) {
        var res = bounce.respond();
        res.end('service not available\n');
    }
    else {
        bounce(ps[Math.floor(Math.random() * ps.length)]);
    }
}).listen(port, '127.0.0.1', function () {
    server.listen(hubPort, function () {
        console.log('bouncy router listening on :' + port);
    });
});
