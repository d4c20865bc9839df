import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# one partition cache for the whole session (Flower processes the tests start inherit it),
# never the user's ~/.cache/fedmoe
os.environ.setdefault("FEDMOE_CACHE_DIR", tempfile.mkdtemp(prefix="fedmoe-test-cache-"))
