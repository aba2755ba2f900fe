"""A VMCache client generated with grpcio-tools from cache.proto (package, service, message
names and field numbers identical to Kata Containers' protocols/cache/cache.proto).
Calls Config, Status, GetBaseVM and Quit and prints what it got as JSON.

usage: kata_cache_client.py PROTO_DIR SOCKET_PATH
"""
import json
import sys
import tempfile

import grpc
from grpc_tools import protoc
import importlib.resources


def main():
    proto_dir, socket_path = sys.argv[1], sys.argv[2]
    out = tempfile.mkdtemp(prefix="kata-cache-client-")
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", f"{proto_dir}/cache.proto"])
    if rc != 0:
        sys.exit(f"protoc failed with {rc}")
    sys.path.insert(0, out)
    import cache_pb2_grpc
    from google.protobuf import empty_pb2

    # Default channel options: C-core sends the percent-encoded socket path as :authority,
    # which the server accepts.
    channel = grpc.insecure_channel(f"unix://{socket_path}")
    stub = cache_pb2_grpc.CacheServiceStub(channel)
    config = stub.Config(empty_pb2.Empty(), timeout=30)
    status = stub.Status(empty_pb2.Empty(), timeout=30)
    vm = stub.GetBaseVM(empty_pb2.Empty(), timeout=120)
    stub.Quit(empty_pb2.Empty(), timeout=30)
    print(json.dumps({
        "config": json.loads(config.Data),
        "agent_config": json.loads(config.AgentConfig),
        "server_pid": status.pid,
        "cached": [{"pid": s.pid, "cpu": s.cpu, "memory": s.memory} for s in status.vmstatus],
        "vm": {"id": vm.id, "hypervisor": json.loads(vm.hypervisor), "cpu": vm.cpu,
               "memory": vm.memory, "cpuDelta": vm.cpuDelta},
    }))


if __name__ == "__main__":
    main()
