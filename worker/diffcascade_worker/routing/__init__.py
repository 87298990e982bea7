"""The pre-generation router: score each prompt before any image is made, send the hardest
share r straight to the heavy stage and the rest to the plan's gated entry stage.

Torch-free (the operator image runs it, the simulator imports its rule): `rule` (the routing
decision), `features` and `learner` (hashed n-grams and an online linear model trained on the
gate's confidences), `scorers` (HADIS's fixed-weight rule and the learned scorer), `router`
(the decision state one process keeps); the HTTP service is `service` + `app` +
`route_command` (`diffcascade-worker route`).
"""
