"""The router's admin API, `meshserve.admin.v1.RolloutService`: the weights of the model versions it
serves side by side, and the rollback. Served on its own port (`--admin-port`, on `--admin-host`), which
Envoy does not route: only the operator's network reaches it. Thin over `rollout.Rollout`."""

from __future__ import annotations

import logging

import grpc

from meshserve.admin.v1 import rollout_service_pb2 as pb
from meshserve.admin.v1 import rollout_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidArgumentError
from services.common.grpc_status import grpc_errors
from services.router.core import Router
from services.router.rollout import format_weights

log = logging.getLogger(__name__)


class RolloutServicer(pb_grpc.RolloutServiceServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    def _state(self) -> pb.Rollout:
        rollout = self.router.rollout
        return pb.Rollout(
            versions=[
                pb.VersionStatus(
                    name=name,
                    weight=rollout.weights[name],
                    replicas_serving=len(self.router.versions[name].healthy),
                    replicas_total=len(self.router.versions[name].replicas),
                    requests=rollout.requests[name],
                )
                for name in rollout.versions
            ],
            stable_version=rollout.stable,
        )

    @grpc_errors
    async def GetRollout(
        self, request: pb.GetRolloutRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRolloutResponse:
        return pb.GetRolloutResponse(rollout=self._state())

    @grpc_errors
    async def SetWeights(
        self, request: pb.SetWeightsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetWeightsResponse:
        weights: dict[str, int] = {}
        for item in request.weights:
            if item.name in weights:
                raise InvalidArgumentError("weights", f"version {item.name[:80]!r} is given twice")
            weights[item.name] = item.weight
        self.router.rollout.set_weights(weights, request.stable_version or None)
        log.info(
            "rollout: weights %s (stable %s)", format_weights(self.router.rollout.weights), self.router.rollout.stable
        )
        return pb.SetWeightsResponse(rollout=self._state())

    @grpc_errors
    async def Rollback(self, request: pb.RollbackRequest, context: grpc.aio.ServicerContext) -> pb.RollbackResponse:
        self.router.rollout.rollback()
        log.info("rollout: rolled back to %s", self.router.rollout.stable)
        return pb.RollbackResponse(rollout=self._state())
