from tests.approvals.conftest import agent  # noqa: F401  (the agent side of CIBA, through the test client)
