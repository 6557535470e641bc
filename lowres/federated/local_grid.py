"""A Flower ``Grid`` that delivers messages to ClientApp handlers in this process, one after another.

The same ServerApp round loop and the same ClientApp handlers as the two Flower engines, without Ray or a
SuperLink: for tests that need determinism and speed, and for ``bench/fed_compression.py``, which runs many
federations side by side. Each message is deep-copied through its wire form (``deflate``/``inflate`` of the
content), so what a client receives is exactly what would have crossed the network.

    grid = LocalGrid(client_app, n_nodes=3)                       # node configs: partition-id / num-partitions
    grid = LocalGrid(client_app, 3, drop={2: 1})                  # node 2's reply to round 1 is lost (killed)
    grid = LocalGrid(client_app, 3, tamper=lambda node, reply: …) # change a reply (a poisoned client)
    grid = LocalGrid(flower_app, 3, run_config={"batch-size": 32})  # a stock Flower app's run config
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

NODE_BASE = 1000  # node ids 1000, 1001, …: distinct from partition ids so a mix-up shows


class LocalGrid:
    """See the module docstring. ``drop`` maps node index → the train round from which it stops replying."""

    def __init__(self, client_app: Any, n_nodes: int, node_configs: list[dict] | None = None,
                 drop: dict[int, int] | None = None, tamper: Callable[[int, Any], Any] | None = None,
                 run_id: int = 1, run_config: dict | None = None):
        from flwr.app import RecordDict
        from flwr.supercore.task_identity import TaskIdentity

        # Messages the server creates carry the run and node of the task creating them (a ServerApp sets
        # this identity in deployment and simulation; here we are that task).
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0
        self.app, self.run_id, self.tamper = client_app, run_id, tamper
        self.run_config = dict(run_config or {})  # what a ClientApp reads from context.run_config (a Flower app's)
        self.drop = dict(drop or {})
        self.nodes = [NODE_BASE + i for i in range(n_nodes)]
        self.node_configs = node_configs or [{"partition-id": i, "num-partitions": n_nodes} for i in range(n_nodes)]
        self.states = {n: RecordDict() for n in self.nodes}
        self.train_rounds: dict[int, int] = {}
        # (message type, node, bytes): content bytes as parsed on arrival, each direction — a check on the
        # server's own counts, measured on the other side of the "wire"
        self.down: list[tuple[str, int, int]] = []
        self.up: list[tuple[str, int, int]] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        from flwr.app import Context

        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            i = self.nodes.index(node)
            if msg.metadata.message_type == "train":
                self.train_rounds[node] = self.train_rounds.get(node, 0) + 1
            if i in self.drop and self.train_rounds.get(node, 0) >= self.drop[i]:
                continue  # a dead node: no reply, the server's timeout rule applies
            received, nbytes = through_wire(msg)
            self.down.append((msg.metadata.message_type, node, nbytes))
            ctx = Context(run_id=self.run_id, node_id=node, node_config=dict(self.node_configs[i]),
                          state=self.states[node], run_config=dict(self.run_config))
            reply = self.app(received, ctx)
            if self.tamper is not None:
                reply = self.tamper(i, reply)
            if not reply.has_error():
                reply, nbytes = through_wire(reply, reply=True)
                self.up.append((msg.metadata.message_type, node, nbytes))
            replies.append(reply)
        return replies


def through_wire(msg: Any, reply: bool = False) -> tuple[Any, int]:
    """(a copy of ``msg`` whose content was serialised and parsed back, as a transfer would; the bytes)."""
    from flwr.app import Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    content = msg.content
    objects = get_all_nested_objects(content)
    inflated: dict[str, Any] = {}
    nbytes = 0
    # post-order: children come before the objects that hold them
    for oid, obj in objects.items():
        blob = obj.deflate()
        nbytes += len(blob)
        kids = {cid: inflated[cid] for cid in (obj.children or {})}
        inflated[oid] = type(obj).inflate(blob, children=kids or None)
    copy = inflated[content.object_id]
    assert isinstance(copy, RecordDict)
    if reply:  # keep the reply's metadata (who answered what), as the SuperLink hands it to the server
        return Message(content=copy, metadata=msg.metadata), nbytes
    return Message(content=copy, dst_node_id=msg.metadata.dst_node_id, message_type=msg.metadata.message_type), nbytes
