"""The security portal: moat database, registration over ssh, provisioning."""
