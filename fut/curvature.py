"""Loss gradients and curvature at a stored parameter vector: gradients, exact Hessian-vector products
(double backward), and the top eigenspace of a batch Hessian by Lanczos."""
from __future__ import annotations

import torch
from torch.func import functional_call

from .flat import ParamLayout


class LossFunction:
    """The mean next-token loss of a batch as a function of the flat parameter vector."""

    def __init__(self, model: torch.nn.Module, layout: ParamLayout):
        self.model, self.layout = model, layout

    def loss(self, flat: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        params = self.layout.unflatten(flat)
        return functional_call(self.model, params, (batch,), {"labels": batch}).loss

    def grad(self, flat: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        flat = flat.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self.loss(flat, batch), flat)
        return g

    def hvp(self, flat: torch.Tensor, batch: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """H(flat, batch) @ v for each row v of `vectors` [n, d] (one graph, n double-backward passes)."""
        flat = flat.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(self.loss(flat, batch), flat, create_graph=True)
        rows = [torch.autograd.grad(g, flat, v, retain_graph=i + 1 < len(vectors))[0]
                for i, v in enumerate(vectors)]
        return torch.stack(rows)


def lanczos_top_eigen(matvec, dim: int, rank: int, iterations: int, seed: int,
                      start: torch.Tensor | None = None, device: torch.device | str = "cpu"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` eigenpairs (largest |λ|) of a symmetric operator by Lanczos with full reorthogonalisation.
    Returns (values [rank], vectors [rank, dim]). `start` (e.g. the previous checkpoint's top vector) seeds it."""
    gen = torch.Generator().manual_seed(seed)   # on the CPU: the same start vector on every device
    q = (start.clone() if start is not None else torch.randn(dim, generator=gen)).to(device)
    q = q / q.norm()
    basis, alphas, betas = [q], [], []
    for i in range(iterations):
        w = matvec(basis[-1])
        alpha = torch.dot(w, basis[-1])
        alphas.append(alpha)
        Q = torch.stack(basis)
        w = w - Q.t() @ (Q @ w)
        w = w - Q.t() @ (Q @ w)          # twice: classical Gram-Schmidt loses orthogonality once
        beta = w.norm()
        if i + 1 == iterations or beta < 1e-10 * alpha.abs().clamp_min(1e-30):
            break
        betas.append(beta)
        basis.append(w / beta)
    k = len(alphas)
    tri = torch.diag(torch.stack(alphas))
    if k > 1:
        off = torch.stack(betas[: k - 1])
        tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
    vals, vecs = torch.linalg.eigh(tri.double().cpu())
    order = vals.abs().argsort(descending=True)[:rank]
    ritz = vecs[:, order].float().t().to(q.device) @ torch.stack(basis[:k])
    return vals[order].float(), ritz.cpu()
