"""The checkout saga as a Temporal workflow: forward activities in order, and on a failure the
compensations of what happened, newest first (try/except, the usual Temporal saga pattern).

Kept apart from temporal_checkout.py so that the workflow sandbox imports only this module and
the plain-data definition.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from benchmarks.peers._definition import (
        COMPENSATION_TIMEOUT_S,
        FORWARD_COMMANDS,
        MAX_COMPENSATION_ATTEMPTS,
        PARTICIPANT_MAX_ATTEMPTS,
        PARTICIPANT_RETRY_DELAYS_S,
        REFUSALS,
        STEP_TIMEOUT_S,
        compensation_plan,
    )

# A transient failure inside a step (its database restarting, say) is retried like sagabus's
# participants retry it: 0.5 s, then x4 up to 30 s, six attempts (sagabus: 0.5, 2, 10, 30, 30 s).
# Compensations get the attempts of all of sagabus's re-sends (6 per delivery x 5 deliveries).
# Business refusals are never retried.
FORWARD_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=PARTICIPANT_RETRY_DELAYS_S[0]),
    backoff_coefficient=4.0,
    maximum_interval=timedelta(seconds=PARTICIPANT_RETRY_DELAYS_S[-1]),
    maximum_attempts=PARTICIPANT_MAX_ATTEMPTS,
    non_retryable_error_types=sorted(REFUSALS),
)
COMPENSATION_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=PARTICIPANT_RETRY_DELAYS_S[0]),
    backoff_coefficient=4.0,
    maximum_interval=timedelta(seconds=PARTICIPANT_RETRY_DELAYS_S[-1]),
    maximum_attempts=PARTICIPANT_MAX_ATTEMPTS * MAX_COMPENSATION_ATTEMPTS,
)


@workflow.defn(name="CheckoutSaga")
class CheckoutSaga:
    @workflow.run
    async def run(self, order: dict[str, Any], local: bool = False) -> dict[str, Any]:
        completed: list[str] = []
        for command in FORWARD_COMMANDS:
            try:
                await self._call(command, order, local, compensation=False)
            except (ActivityError, ApplicationError) as err:
                # (a local activity's failure can arrive as the bare ApplicationError)
                cause = err.cause if isinstance(err, ActivityError) else err
                refused = isinstance(cause, ApplicationError) and cause.type in REFUSALS
                # a refusal means the step did not happen; anything else (retries exhausted,
                # timed out) leaves its outcome unknown, so it is compensated too, as in sagabus
                unknown = None if refused else command
                reason = f"{command} failed: {cause.type if refused else err}"  # type: ignore[union-attr]
                return await self._compensate(order, completed, unknown, reason, local)
            completed.append(command)
        return {"status": "COMPLETED", "completed": completed}

    async def _compensate(
        self,
        order: dict[str, Any],
        completed: list[str],
        unknown: str | None,
        reason: str,
        local: bool,
    ) -> dict[str, Any]:
        done: list[str] = []
        for command in compensation_plan(completed, unknown):
            try:
                await self._call(command, order, local, compensation=True)
            except (ActivityError, ApplicationError) as err:
                return {
                    "status": "FAILED_NEEDS_MANUAL",
                    "reason": f"{reason}; then {command} failed: {err.cause or err}",
                    "completed": completed,
                    "compensated": done,
                }
            done.append(command)
        return {
            "status": "COMPENSATED",
            "reason": reason,
            "completed": completed,
            "compensated": done,
        }

    @staticmethod
    async def _call(command: str, order: dict[str, Any], local: bool, *, compensation: bool) -> Any:
        timeout = timedelta(seconds=COMPENSATION_TIMEOUT_S if compensation else STEP_TIMEOUT_S)
        retry = COMPENSATION_RETRY if compensation else FORWARD_RETRY
        if local:
            return await workflow.execute_local_activity(
                command, order, start_to_close_timeout=timeout, retry_policy=retry
            )
        return await workflow.execute_activity(
            command, order, start_to_close_timeout=timeout, retry_policy=retry
        )
