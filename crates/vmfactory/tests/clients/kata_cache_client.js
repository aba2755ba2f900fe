// A VMCache client on @grpc/grpc-js, loading cache.proto at run time with
// @grpc/proto-loader (package, service, message names and field numbers identical to Kata
// Containers' protocols/cache/cache.proto), with default channel options. Calls Config,
// Status, GetBaseVM and Quit and prints what it got as JSON.
//
// usage: NODE_PATH=<dir>/node_modules node kata_cache_client.js PROTO_DIR SOCKET_PATH
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

function call(client, method, timeoutSeconds) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutSeconds * 1000);
    client[method]({}, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

async function main() {
  const [protoDir, socketPath] = process.argv.slice(2);
  const definition = protoLoader.loadSync(path.join(protoDir, "cache.proto"), {
    includeDirs: [protoDir],
    keepCase: true,
    longs: Number,
    defaults: true,
  });
  const cache = grpc.loadPackageDefinition(definition).cache;
  const client = new cache.CacheService(`unix://${socketPath}`, grpc.credentials.createInsecure());
  const config = await call(client, "Config", 30);
  const status = await call(client, "Status", 30);
  const vm = await call(client, "GetBaseVM", 120);
  await call(client, "Quit", 30);
  client.close();
  console.log(JSON.stringify({
    config: JSON.parse(config.Data.toString()),
    agent_config: JSON.parse(config.AgentConfig.toString()),
    server_pid: status.pid,
    cached: status.vmstatus.map((s) => ({ pid: s.pid, cpu: s.cpu, memory: s.memory })),
    vm: {
      id: vm.id,
      hypervisor: JSON.parse(vm.hypervisor.toString()),
      cpu: vm.cpu,
      memory: vm.memory,
      cpuDelta: vm.cpuDelta,
    },
  }));
}

main().catch((err) => {
  console.error(`kata_cache_client.js: ${err.stack || err}`);
  process.exit(1);
});
