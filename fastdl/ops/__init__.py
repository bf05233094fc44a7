"""torch.library custom ops, one module per op family. Importing this package registers them."""
from . import linear  # noqa: F401
from . import cross_entropy  # noqa: F401
