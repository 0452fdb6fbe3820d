"""BatchTrigger: waits in the triggerer, not in a worker slot, until a Batch API batch is done."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class BatchTrigger(BaseTrigger):
    """Poll an OpenAI-compatible endpoint's batch until it is completed, failed, expired or cancelled.

    :param endpoint: the endpoint's config as plain data (names its key's variable or connection, never the key)
    :param batch_id: the batch to wait for
    :param state_uri: where the step stored the batch's state (for messages)
    :param poll_s: seconds between polls
    """

    def __init__(self, *, endpoint: dict[str, Any], batch_id: str, state_uri: str, poll_s: float) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.batch_id = batch_id
        self.state_uri = state_uri
        self.poll_s = poll_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{type(self).__module__}.{type(self).__qualname__}", {
            "endpoint": self.endpoint, "batch_id": self.batch_id, "state_uri": self.state_uri, "poll_s": self.poll_s}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from openai import AsyncOpenAI

        from cogumi_tasks.core.config import EndpointConfig
        from cogumi_tasks.llm.batch import poll_batch
        from cogumi_tasks.llm.client import LLMCallFailed

        endpoint = EndpointConfig.model_validate(self.endpoint)
        client = AsyncOpenAI(base_url=endpoint.base_url, api_key=await self._api_key(endpoint),
                             timeout=endpoint.timeout_s, max_retries=0)
        try:
            batch = await poll_batch(client, self.batch_id, name=endpoint.name, source=self.state_uri,
                                     poll_s=self.poll_s, progress=False)
            event = {"status": batch.status, "batch_id": self.batch_id}
        except LLMCallFailed as exc:
            event = {"status": "error", "batch_id": self.batch_id, "message": str(exc)}
        finally:
            await client.close()
        yield TriggerEvent(event)

    @staticmethod
    async def _api_key(endpoint: Any) -> str:
        """The key as a task would see it: the connection's password, else the endpoint's variable."""
        from cogumi_tasks.llm.client import resolve_api_key

        if endpoint.conn_id:
            from airflow.sdk import BaseHook

            return (await BaseHook.aget_connection(endpoint.conn_id)).password or ""
        return resolve_api_key(endpoint)
