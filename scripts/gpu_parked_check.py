"""On a GPU: ``parity.tensors.parked`` moves a module's tensors to the host and back, keeping tensor objects, values,
gradients and shared storages (on a CPU parking moves nothing, so only a GPU checks the device path). Prints one
JSON line; exit 1 when a property does not hold."""
import json
import sys

import torch

from parity.tensors import parked

m = torch.nn.Module()
flat = torch.randn(24, device="cuda", dtype=torch.bfloat16)
m.a = torch.nn.Parameter(flat[:12].view(3, 4))
m.b = torch.nn.Parameter(flat[12:].view(4, 3).t())
m.register_buffer("c", flat[4:8])
m.d = torch.nn.Parameter(torch.randn(5, device="cuda"))
m.a.grad = torch.randn(3, 4, device="cuda", dtype=torch.bfloat16)
ids, before = [id(t) for t in (m.a, m.b, m.c, m.d)], [t.clone() for t in (m.a, m.b, m.c, m.d, m.a.grad)]
free0 = torch.cuda.memory_allocated()
with parked(m) as n:
    inside = {"moved": n, "on_host": all(t.device.type == "cpu" for t in (m.a, m.b, m.c, m.d, m.a.grad)),
              "device_bytes_left": torch.cuda.memory_allocated()}
after = [m.a, m.b, m.c, m.d, m.a.grad]
ptrs = {t.untyped_storage().data_ptr() for t in (m.a, m.b, m.c)}
out = {**inside, "device_bytes_before": free0, "same_objects": [id(t) for t in (m.a, m.b, m.c, m.d)] == ids,
       "equal": all(torch.equal(x, y) for x, y in zip(after, before)),
       "on_cuda": all(t.is_cuda for t in after), "one_storage": len(ptrs) == 1}
print(json.dumps(out))
sys.exit(0 if out["moved"] == 4 and out["on_host"] and out["same_objects"] and out["equal"] and out["on_cuda"]
         and out["one_storage"] else 1)
