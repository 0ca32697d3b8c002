"""instapg's service code: everything the Lambda functions run besides app.py."""

import logging

# Module loggers are chalicelib.*; in Lambda the root handler prints them.
# (Chalice's own "instapg" logger only carries its unhandled-error traces.)
logging.getLogger(__name__).setLevel(logging.INFO)
