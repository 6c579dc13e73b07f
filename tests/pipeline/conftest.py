from tests.flowmodel.conftest import fashion_mnist  # noqa: F401  (re-exported fixture)
