"""Shell-wide basics every role uses: settings from the environment, genesis and key files."""
