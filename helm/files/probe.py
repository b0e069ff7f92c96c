"""Exit 0 when the sidecar at argv[1] reports SERVING (grpc.health.v1), 1 otherwise.

The kubelet's built-in gRPC probe speaks no TLS, so a sidecar that serves TLS on its TCP port
(sidecar.tls.secretName) is probed with this script (an exec probe) on a Unix socket inside
the pod that only its containers can reach.
"""
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=4)
        except grpc.RpcError as err:
            print(f"{address}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
