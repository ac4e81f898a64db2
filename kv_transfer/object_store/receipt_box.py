"""Where prefill's worker half leaves each transfer's receipt for the scheduler half that writes the KV handle.

vLLM runs both halves of a connector in its EngineCore process when the engine has one worker (its uniprocess
executor: every CPU engine and every single-GPU one), and asks the scheduler half for a finished request's
`kv_transfer_params` before it hands it the step's worker output: a process-wide box is the one way across in time.
1. The sender thread posts a transfer's receipt once its last part is in the object store; `wait_for_save` holds
   the engine's step until then, so the receipt is here before vLLM calls `request_finished`.
2. `request_finished` takes it (once) into the RemoteKV it returns.
Where the halves run in different processes the box stays empty, and decode claims the parts from the store instead.
The box is bounded: receipts nobody takes (a request aborted between the two) are dropped oldest first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

NUM_KEPT_RECEIPTS = 1_000


class ReceiptBox:
    def __init__(self, capacity: int = NUM_KEPT_RECEIPTS):
        self._capacity = capacity
        self._receipts: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def post(self, transfer_key: str, receipt: str) -> None:
        with self._lock:
            self._receipts[transfer_key] = receipt
            while len(self._receipts) > self._capacity:
                self._receipts.popitem(last=False)

    def take(self, transfer_key: str) -> str | None:
        with self._lock:
            return self._receipts.pop(transfer_key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._receipts)


# The one box of this process: both connector halves of an engine built here share it.
PROCESS_RECEIPTS = ReceiptBox()
