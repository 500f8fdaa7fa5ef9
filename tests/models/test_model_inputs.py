"""Bad input to the library's models fails early with an error naming the argument, the expected
and the actual shape or value (the models check their data before any site is sampled)."""
import pytest
import torch

from ppl.models import cca, iohmm, lda, mixture_of_experts, nmf

Y, U = torch.randn(2, 10), torch.randn(2, 10, 3)


@pytest.mark.parametrize("call, pattern", [
    (lambda: iohmm.model(Y, U[:, :9]),
     r"u must have shape \(2, 10\) \+ \(input_dim,\) to match y, got \(2, 9, 3\)"),
    (lambda: iohmm.model(Y.long(), U), r"y must be a floating tensor of shape \(T,\) or \(N, T\)"),
    (lambda: iohmm.model(Y, U, K=0), r"K must be an integer >= 1, got 0"),
    (lambda: mixture_of_experts.model(torch.randn(5, 2), torch.randn(4)),
     r"y must be a floating tensor of shape \(N,\) = \(5,\), got \(4,\)"),
    (lambda: mixture_of_experts.model(torch.randn(5), torch.randn(5)),
     r"x must be a floating tensor of shape \(N, D\)"),
    (lambda: mixture_of_experts.model(torch.randn(5, 2), torch.randn(5), gating="tree"),
     r"gating must be one of"),
    (lambda: cca.model(torch.randn(5, 2), torch.randn(4, 3)),
     r"x1 and x2 must have the same number of rows N, got 5 and 4"),
    (lambda: cca.model(torch.randn(5, 2), torch.randn(5, 3), noise="iso"),
     r"noise must be one of \('full', 'diag'\)"),
    (lambda: lda.model(torch.tensor([[0, 1, 5]]), V=4),
     r"words must hold word ids in \[0, V=4\), got range \[0, 5\]"),
    (lambda: lda.model(torch.rand(2, 3)), r"words must be an integer tensor of shape \(D, L\)"),
    (lambda: lda.model(torch.zeros(2, 3, dtype=torch.long), mask=torch.ones(3, 2, dtype=torch.bool)),
     r"mask must be a bool tensor of shape \(2, 3\) like words"),
    (lambda: nmf.model(torch.tensor([[1.0, 1.5]])),
     r"X must hold non-negative integer counts, got X\[0, 1\] = 1.5"),
    (lambda: nmf.model(torch.ones(2, 2), a=0.0), r"a must be a positive number, got 0.0"),
])
def test_bad_input_names_the_argument(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()
