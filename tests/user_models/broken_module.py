"""A user module that fails to import (the tests check the message names the cause)."""
import a_package_that_is_not_installed  # noqa: F401
