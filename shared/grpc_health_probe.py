"""Ask a gRPC server's health service (grpc.health.v1.Health/Check) how it is: exit 0 if it says
SERVING, 1 for anything else (NOT_SERVING, a service it does not know, no answer within the
timeout, nothing listening, a call refused by a server stopping, arguments it cannot use), saying
which on stderr; never 2, argparse's exit for a usage error, which Docker reserves for a
healthcheck. The healthcheck of docker-compose.yml's gRPC servers (shared.grpc_health says what
SERVING means):

    python -m shared.grpc_health_probe 127.0.0.1:50051                # the server as a whole
    python -m shared.grpc_health_probe 127.0.0.1:50051 --service hseshop.orders.v1.Orders

It imports grpcio and the health messages only, nothing of the shop's: it starts in a fraction of
a second, every 10 s."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TIMEOUT_SECONDS = 5.0
SERVING = health_pb2.HealthCheckResponse.SERVING


def status(address: str, service: str = "", timeout: float = DEFAULT_TIMEOUT_SECONDS) -> str:
    """The health `address` gives `service` ("" the server as a whole): a status's name
    (SERVING, NOT_SERVING, ...), or the gRPC failure's code name (NOT_FOUND, UNAVAILABLE,
    DEADLINE_EXCEEDED, ...) with its details."""
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


class _Parser(argparse.ArgumentParser):
    """argparse's, but for the exit of a usage error: 1, not 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m shared.grpc_health_probe",
                     description="Exit 0 if the server says SERVING, else 1 (a usage error too).")
    parser.add_argument("address", help="host:port (any gRPC target)")
    parser.add_argument("--service", default="",
                        help="a service's full name (default: the server as a whole)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS,
                        help="seconds to wait for the answer (default: %(default)s)")
    args = parser.parse_args(argv)
    said = status(args.address, args.service, args.timeout)
    if said == health_pb2.HealthCheckResponse.ServingStatus.Name(SERVING):
        return 0
    print(f"{args.address} {args.service or '(the server)'}: {said}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
