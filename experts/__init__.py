"""Expert layers of Mixture-of-Experts models: specs and weights (``experts.specs``), the gate
(``experts.gating``) and grouped expert compute (``experts.compute``)."""
