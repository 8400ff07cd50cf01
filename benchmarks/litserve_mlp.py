"""LitServe serving the benchmark MLP, tuned for it: `python -m benchmarks.litserve_mlp --port N`.

Its own module (LitServe starts its inference worker by pickling the API class, so the class
lives at module level; and `benchmarks.serving`, which the ranks import for the model, stays free
of LitServe). Batching on: up to 32 examples, waiting at most `--batch-timeout` seconds for them;
1 torch thread. Its default process layout: one HTTP process, one inference process.
"""

from __future__ import annotations

import argparse

import litserve as ls
import torch

from benchmarks.serving import LITSERVE_BATCH_TIMEOUT, MAX_BATCH, build_mlp


class MLPAPI(ls.LitAPI):
    def setup(self, device) -> None:
        torch.set_num_threads(1)
        self.model = build_mlp()

    def decode_request(self, request: dict) -> torch.Tensor:
        return torch.tensor(request["inputs"], dtype=torch.float32)

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, output: torch.Tensor) -> dict:
        return {"outputs": output.tolist()}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.litserve_mlp")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--batch-timeout", type=float, default=LITSERVE_BATCH_TIMEOUT)
    args = parser.parse_args()
    api = MLPAPI(max_batch_size=MAX_BATCH, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
