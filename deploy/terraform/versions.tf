terraform {
  # templatefile() with for directives, optional() object attributes: 1.3 or later.
  required_version = ">= 1.3.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0, < 7.0"
    }
  }
}
