variable "name" {
  type        = string
  description = "Prefix of every resource's Name tag and of the node names (NAME-1, NAME-2, ...); also the Ansible inventory group's hosts."
  default     = "filch"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,30}$", var.name))
    error_message = "The name must be lowercase letters, digits and dashes, starting with a letter, at most 31 characters."
  }
}

variable "node_count" {
  type        = number
  description = "How many filch nodes (EC2 instances). Each runs an etcd member: an odd number of 3 to 7 keeps etcd's quorum sensible."
  default     = 3

  validation {
    condition     = var.node_count >= 1 && var.node_count <= 7
    error_message = "node_count must be between 1 and 7 (etcd recommends at most 7 members)."
  }
}

variable "instance_type" {
  type        = string
  description = "EC2 instance type of every node."
  default     = "t3.medium"
}

variable "root_volume_size" {
  type        = number
  description = "Size in GiB of each node's root volume (etcd data, task logs and bundles live on it)."
  default     = 20
}

variable "vpc_cidr" {
  type        = string
  description = "CIDR block of the VPC the module creates."
  default     = "10.42.0.0/16"
}

variable "subnet_cidr" {
  type        = string
  description = "CIDR block of the one public subnet, inside vpc_cidr; nodes get addresses from it."
  default     = "10.42.1.0/24"
}

variable "availability_zone" {
  type        = string
  description = "Availability zone of the subnet; empty picks the region's first available zone."
  default     = ""
}

variable "ssh_cidr_blocks" {
  type        = list(string)
  description = "CIDR blocks allowed to reach the nodes on SSH (22), i.e. where Ansible runs from. Nothing else is open to the outside."

  validation {
    condition     = length(var.ssh_cidr_blocks) > 0 && alltrue([for cidr in var.ssh_cidr_blocks : can(cidrhost(cidr, 0))])
    error_message = "Give at least one valid CIDR block, e.g. [\"203.0.113.7/32\"]."
  }
}

variable "ssh_public_key" {
  type        = string
  description = "OpenSSH public key installed for the AMI's login user (an aws_key_pair is created from it)."
}

variable "ssh_user" {
  type        = string
  description = "Login user of the Debian AMI, written into the Ansible inventory as ansible_user."
  default     = "admin"
}

variable "ami_owner" {
  type        = string
  description = "AWS account that publishes the Debian 12 AMIs (Debian's official account)."
  default     = "136693071363"
}

variable "ami_name_pattern" {
  type        = string
  description = "Name pattern of the Debian 12 AMI; the most recent match is used."
  default     = "debian-12-amd64-*"
}

variable "ansible_group_vars" {
  type        = map(string)
  description = "Extra variables for the inventory's filch group, e.g. { filch_node_cpus = \"2\" }; see deploy/ansible/README.md."
  default     = {}
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource."
  default     = {}
}
