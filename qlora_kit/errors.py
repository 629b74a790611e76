"""The one exception type that means "the user can fix this": the CLI turns it into exit status 2."""


class UserError(Exception):
    """A mistake in a recipe, a command line or an input file.

    The message is shown as a single ``error:`` line, so it names the key, file or row and says what to do.
    """
