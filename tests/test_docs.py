"""The documentation that is generated from code stays in step with it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class TestConfigurationReference:
    def test_page_matches_settings(self):
        """docs/configuration.md is what scripts/gen_config_docs.py renders today."""
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--check"],
            capture_output=True,
            check=False,
        )
        assert 0 == result.returncode, "run: python scripts/gen_config_docs.py"


class TestErrorsPage:
    def test_every_code_is_documented(self):
        """docs/errors.md has a row for every ErrorCode with its status."""
        from bastion.errors import ErrorCode

        page = (ROOT / "docs" / "errors.md").read_text()
        missing = [c.value for c in ErrorCode if f"| `{c.value}` | {c.status} |" not in page]
        assert [] == missing
